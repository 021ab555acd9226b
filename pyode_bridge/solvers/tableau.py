"""Butcher tableaux: the one format every explicit Runge-Kutta method in pyode-bridge uses.

Adding a method means adding a :class:`ButcherTableau` to :data:`TABLEAUX`.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ButcherTableau", "TABLEAUX", "ADAPTIVE", "FIXED"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Attributes:
        name: method name accepted by ``odeint(method=...)``.
        order: order of the propagated solution.
        c: stage times, length S.
        a: strictly lower-triangular stage coefficients, ``a[i]`` has ``i`` entries (``a[0] == ()``).
        b: solution weights, length S.
        b_err: error-estimate weights ``b - b_hat`` (length S), ``None`` for fixed-step methods.
        error_order: order of the embedded (lower-order) solution + 1; sets the controller exponent.
        fsal: the last stage is evaluated at the new solution (``a[-1] == b``), so it is the next
            step's first stage.
        dense: continuous extension ``b_i(theta) = sum_p dense[i][p] * theta**(p+1)`` (S rows),
            or ``None`` to use cubic Hermite interpolation between steps.
    """

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    b_err: tuple | None = None
    error_order: int | None = None
    fsal: bool = False
    dense: tuple | None = None

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    def dense_weights(self, theta: float) -> list:
        """Weights ``b_i(theta)`` of the continuous extension at ``theta`` in [0, 1] (length S)."""
        out = []
        for row in self.dense:
            acc, th = 0.0, theta
            for coef in row:
                acc += coef * th
                th *= theta
            out.append(acc)
        return out


def _dopri5() -> ButcherTableau:
    b = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
    b_hat = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
    # Dormand-Prince's 4th-order continuous extension (Hairer, Norsett & Wanner, II.6), written as
    # polynomial coefficients of theta, theta^2, theta^3, theta^4 per stage.
    dense = (
        (1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799),
        (0.0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072),
        (0.0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632),
        (0.0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844),
        (0.0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423),
    )
    return ButcherTableau(
        name="dopri5", order=5,
        c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=((),
           (1 / 5,),
           (3 / 40, 9 / 40),
           (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           b[:6]),
        b=b, b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=5, fsal=True, dense=dense)


def _tsit5() -> ButcherTableau:
    b = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742,
         -3.290069515436081, 2.324710524099774, 0.0)
    # Tsitouras (2011) error weights b - b_hat, as tabulated in OrdinaryDiffEq.jl.
    b_err = (-0.00178001105222577714, -0.0008164344596567469, 0.007880878010261995,
             -0.1447110071732629, 0.5823571654525552, -0.45808210592918697, 1 / 66)
    # Tsitouras' free 4th-order interpolant: b_i(theta) as polynomials without constant term.
    r = (
        (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
        (0.0, 0.13169999999999998, -0.2234, 0.1017),
        (0.0, 3.9302962368947516, -5.941033872131505, 2.490627285651253),
        (0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902),
        (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
        (0.0, -27.896526289197286, 65.09189467479366, -34.87065786149661),
        (0.0, 1.5, -4.0, 2.5),
    )
    return ButcherTableau(
        name="tsit5", order=5,
        c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
        a=((),
           (0.161,),
           (-0.008480655492356989, 0.335480655492357),
           (2.897153057105493, -6.359448489975075, 4.3622954328695815),
           (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
           (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
            -0.028269050394068383),
           b[:6]),
        b=b, b_err=b_err, error_order=5, fsal=True, dense=r)


def _bosh3() -> ButcherTableau:
    b = (2 / 9, 1 / 3, 4 / 9, 0.0)
    b_hat = (7 / 24, 1 / 4, 1 / 3, 1 / 8)
    return ButcherTableau(
        name="bosh3", order=3, c=(0.0, 1 / 2, 3 / 4, 1.0),
        a=((), (1 / 2,), (0.0, 3 / 4), b[:3]),
        b=b, b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=3, fsal=True)


def _adaptive_heun() -> ButcherTableau:
    return ButcherTableau(
        name="adaptive_heun", order=2, c=(0.0, 1.0), a=((), (1.0,)),
        b=(0.5, 0.5), b_err=(-0.5, 0.5), error_order=2)


TABLEAUX = {
    "euler": ButcherTableau(name="euler", order=1, c=(0.0,), a=((),), b=(1.0,)),
    "midpoint": ButcherTableau(name="midpoint", order=2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0)),
    # torchdiffeq's "rk4" is Kutta's 3/8 rule; keep that so results match after an import swap.
    "rk4": ButcherTableau(name="rk4", order=4, c=(0.0, 1 / 3, 2 / 3, 1.0),
                          a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                          b=(1 / 8, 3 / 8, 3 / 8, 1 / 8)),
    "dopri5": _dopri5(),
    "tsit5": _tsit5(),
    "bosh3": _bosh3(),
    "adaptive_heun": _adaptive_heun(),
}
ADAPTIVE = tuple(k for k, v in TABLEAUX.items() if v.adaptive)
FIXED = tuple(k for k, v in TABLEAUX.items() if not v.adaptive)
