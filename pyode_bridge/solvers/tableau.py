"""Butcher tableaux: the one format every Runge-Kutta method in pyode-bridge uses, explicit or
implicit.

Adding a method means adding a :class:`ButcherTableau` to :data:`TABLEAUX`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

__all__ = ["ButcherTableau", "TABLEAUX", "ADAPTIVE", "FIXED", "IMPLICIT"]


@dataclass(frozen=True)
class ButcherTableau:
    """A Runge-Kutta method, explicit or implicit.

    Every tableau's first stage is ``f(t, y)`` (``c[0] == 0``, ``a[0] == ()``): the stepping loop
    supplies it, and it is the start derivative of the dense output. An implicit method whose own
    first stage is implicit (implicit Euler, Gauss, Radau IIA) is written with this explicit stage
    prepended, weight ``b[0] = 0``: the same method.

    Attributes:
        name: method name accepted by ``odeint(method=...)``.
        order: order of the propagated solution.
        c: stage times, length S.
        a: the rows of the stage matrix ``A``, ``a[i]`` up to its last non-zero entry (missing
            entries are zero): ``i`` entries for an explicit method, ``i + 1`` for a diagonally
            implicit one (``a[i][i]`` is the diagonal), ``S`` for a fully implicit one. A tableau
            with any entry on or above the diagonal is :attr:`implicit`; its steps solve the stage
            equations by Newton's method (:mod:`pyode_bridge.solvers.implicit`).
        b: solution weights, length S.
        b_err: error-estimate weights ``b - b_hat`` (length S), ``None`` for fixed-step methods.
        error_order: order of the embedded (lower-order) solution + 1; sets the controller exponent.
        fsal: the last stage is evaluated at the new solution (``a[-1] == b``), so it is the next
            step's first stage.
        carry_last: the last stage is the next step's first stage although it is *not* evaluated
            at the new solution (torchdiffeq's ``adaptive_heun`` and ``fehlberg2``: one evaluation
            per step fewer). Its point differs from the new solution by ``h * (b - a[-1]) . k``,
            of the size of the error estimate, so the method keeps its order; the solve carries
            that derivative from step to step. Adaptive solves only: a fixed grid (and a replay of
            one) evaluates ``f(t, y)`` at every step.
        dense: continuous extension ``b_i(theta) = sum_p dense[i][p] * theta**(p+1)`` (one row per
            stage and per dense stage), or ``None`` to use cubic Hermite interpolation between steps.
        dense_stages: extra stages ``(c_j, a_j)`` evaluated only when the dense output of a step is
            needed (after the S stages, in order; ``a_j`` spans the stages before it).
    """

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    b_err: tuple | None = None
    error_order: int | None = None
    fsal: bool = False
    carry_last: bool = False
    dense: tuple | None = None
    dense_stages: tuple = ()

    def __post_init__(self):
        if not (len(self.a) == len(self.b) == len(self.c)):
            raise ValueError(f"tableau {self.name!r}: a, b and c must have one entry per stage "
                             f"(got {len(self.a)}, {len(self.b)}, {len(self.c)})")
        if self.c[0] != 0.0 or self.a[0] != ():
            raise ValueError(f"tableau {self.name!r}: the first stage must be f(t, y) (c[0] = 0, "
                             "a[0] = ()); prepend an explicit stage with weight b[0] = 0")
        if self.b_err is not None and self.error_order is None:
            # The step-size controller's exponents come from it (PIController).
            raise ValueError(f"tableau {self.name!r}: an adaptive tableau (b_err given) needs "
                             "error_order, the order of its embedded solution + 1")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @cached_property  # read on every step: computed once (the tableau is frozen)
    def implicit(self) -> bool:
        """Whether some stage depends on itself or a later stage (a non-zero ``a[i][j]``, ``j >= i``)."""
        return any(x != 0.0 for i, row in enumerate(self.a) for x in row[i:])

    def dense_weights(self, theta: float) -> list:
        """Weights ``b_i(theta)`` of the continuous extension at ``theta`` in [0, 1] (length S)."""
        if self.dense is None:
            raise ValueError(f"tableau {self.name!r} has no continuous extension (dense is None)")
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
    # Shampine's embedded 4th-order solution (b + 2 * Hairer's b_hat) / 3, as torchdiffeq and
    # torchode use: its error estimate is 2/3 of Hairer's, so equal rtol/atol take their steps.
    b_hat = (1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
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
        b=(0.5, 0.5), b_err=(-0.5, 0.5), error_order=2, carry_last=True)


def _dopri8() -> ButcherTableau:
    # Prince & Dormand's RK8(7)13M (1981), torchdiffeq's "dopri8": 13 stages and a 14th, FSAL
    # stage f(t1, y1) that serves the error control's successor step and the dense output.
    b = (14005451 / 335480064, 0.0, 0.0, 0.0, 0.0, -59238493 / 1068277825, 181606767 / 758867731,
         561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299,
         118820643 / 751138087, -528747749 / 2220607170, 1 / 4, 0.0)
    b_hat = (13451932 / 455176623, 0.0, 0.0, 0.0, 0.0, -808719846 / 976000145, 1757004468 / 5645159321,
             656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535,
             53011238 / 667516719, 2 / 45, 0.0, 0.0)
    a = ((),
         (1 / 18,),
         (1 / 48, 1 / 16),
         (1 / 32, 0.0, 3 / 32),
         (5 / 16, 0.0, -75 / 64, 75 / 64),
         (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
         (29443841 / 614563906, 0.0, 0.0, 77736538 / 692538347, -28693883 / 1125000000,
          23124283 / 1800000000),
         (16016141 / 946692911, 0.0, 0.0, 61564180 / 158732637, 22789713 / 633445777,
          545815736 / 2771057229, -180193667 / 1043307555),
         (39632708 / 573591083, 0.0, 0.0, -433636366 / 683701615, -421739975 / 2616292301,
          100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287),
         (246121993 / 1340847787, 0.0, 0.0, -37695042795 / 15268766246, -309121744 / 1061227803,
          -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457,
          123872331 / 1001029789),
         (-1028468189 / 846180014, 0.0, 0.0, 8478235783 / 508512852, 1311729495 / 1432422823,
          -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
          -45442868181 / 3398467696, 3065993473 / 597172653),
         (185892177 / 718116043, 0.0, 0.0, -3185094517 / 667107341, -477755414 / 1098053517,
          -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
          -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083),
         (403863854 / 491063109, 0.0, 0.0, -5068492393 / 434740067, -411421997 / 543043805,
          652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
          3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060),
         b[:13])
    c = (0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
         1201146811 / 1299019798, 1.0, 1.0, 1.0)
    # torchdiffeq interpolates dopri8 by a quartic through a 5th-order midpoint value. This is a
    # 7th-order continuous extension instead (its order conditions are checked in
    # tests/test_solvers.py): between steps it is as accurate as the step ends, at the price of 5
    # evaluations, made only for a step whose dense output is asked for.
    # Extra stages for the dense output only: approximations of y(t0 + c h) of order 5 (c = 1/3, 2/3)
    # then 6 (c = 1/4, 1/2, 3/4), each row solving that stage's order conditions (bootstrapping).
    dense_stages = (
        (0.3333333333333333, (0.048930893732309265, 0.0, 0.0, 0.0, 0.0, 0.08488001053286597, 0.21024417835644188,
         0.022121297249238725, -0.019349505724347345, -0.02566625635940119, 0.02829233124662445,
         -0.0053732052334661395, -0.005373205233466121, -0.00537320523346615)),
        (0.6666666666666666, (0.060900914502604014, 0.0, 0.0, 0.0, 0.0, 0.11230072484343173, 0.16358311979228143,
         0.0809825005765165, 0.0578154211760268, 0.05007337855689856, 0.034131791091424384, -0.0070339997576182355,
         -0.007033999757618226, -0.007033999757618241, 0.12798081540033796)),
        (0.25, (0.048265841805688034, 0.0, 0.0, 0.0, 0.0, 0.023570566808448233, 0.1967946644673825,
         0.0004621904743618445, -0.00957872000628577, -0.029242783434513326, -0.00671115885632789, 0.02323084463278946,
         -0.010108374867563314, -0.009773883535953392, -0.015151371087763129, 0.038242183599736745)),
        (0.5, (0.05367791871448734, 0.0, 0.0, 0.0, 0.0, 0.05456031310757838, 0.1564352077025585, 0.04211117394372371,
         0.028260464088071438, -0.0014627760756855959, -0.011225008506893949, 0.012216808763617935,
         -0.018498638797796292, 0.012317866225743814, 0.06114192685135156, 0.007722835972372044, 0.10274190801087112)),
        (0.75, (0.05087050900203743, 0.0, 0.0, 0.0, 0.0, 0.09567782372824389, 0.17420277195545184,
         0.05733618327938904, 0.03729115604187111, 0.04038848726350921, 0.0002736813740683375, -0.01374298936700733,
         0.0005616771249403955, 0.014393263752858947, 0.020336541304566375, 0.13356813314122215, 0.08405233201746964,
         0.054790429381378965)),
    )
    # b_i(theta) of the 7th-order continuous extension (coefficients of theta..theta^7), rows: the
    # 13 stages, the FSAL stage, the 5 dense stages.
    zero = (0.0,) * 7
    dense = (
        (1.0, -8.414494733664432, 33.974007914226384, -72.564461341809, 84.10084708561574, -50.03963569639716,
         11.985484263169997),
        zero,
        zero,
        zero,
        zero,
        (0.0, 14.146051563789106, -101.15381918013342, 299.25729590184824, -447.9811811493514, 331.6873271944676,
         -96.01112665923137),
        (0.0, 23.98349015231527, -150.81130994655402, 390.25145238879594, -503.5500693007429, 321.3487601101461,
         -80.98301059675916),
        (0.0, 5.189204305449493, -25.819448948993884, 57.265269286061525, -56.14272502289417, 22.74599114215595,
         -2.534780092375467),
        (0.0, 1.1381939616369994, -5.429915028789765, -8.044043123882291, 43.858529804573266, -52.874557227226816,
         20.59203199987415),
        (0.0, 10.382492607253768, -85.59900025783433, 302.51519752828, -520.6596942525691, 428.88127513182286,
         -134.85970772603085),
        (0.0, 3.3878901266974566, -34.88290715723133, 139.21475407284552, -259.07868018295443, 224.21258852038116,
         -72.69545789722827),
        (0.0, -6.765664187520368, 67.53690967432658, -263.6311483232083, 484.5894161355894, -416.2714718325284,
         134.30384899458824),
        (0.0, 5.986169537376438, -63.05896151346419, 253.90235027774756, -475.0031097839546, 412.354167101641,
         -133.93061561934624),
        (0.0, -0.500000000000014, 8.977777777777916, -44.83333333333386, 93.60000000000096, -87.11111111111194,
         29.866666666666934),
        zero,
        zero,
        (0.0, -25.60000000000014, 193.42222222222347, -554.6666666666711, 768.0000000000076, -517.6888888888951,
         136.53333333333532),
        (0.0, -14.400000000000192, 83.2000000000017, -200.00000000000594, 259.2000000000102, -179.2000000000084,
         51.20000000000264),
        (0.0, -8.533333333333383, 79.6444444444449, -298.6666666666683, 529.0666666666694, -438.0444444444468,
         136.53333333333407),
    )
    return ButcherTableau(name="dopri8", order=8, c=c, a=a, b=b,
                          b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=8, fsal=True,
                          dense=dense, dense_stages=dense_stages)


def _fehlberg2() -> ButcherTableau:
    # Fehlberg's RKF2(1) as torchdiffeq runs it: the 2nd-order solution is propagated, the 1st-order
    # one (whose derivative is the third stage) only measures the error.
    b = (1 / 512, 255 / 256, 1 / 512)
    b_hat = (1 / 256, 255 / 256, 0.0)
    return ButcherTableau(
        name="fehlberg2", order=2, c=(0.0, 1 / 2, 1.0), a=((), (1 / 2,), (1 / 256, 255 / 256)),
        b=b, b_err=tuple(x - y for x, y in zip(b, b_hat)), error_order=2, carry_last=True)


_S2, _S3, _S15 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(15.0)


def _collocation_dense(tab: ButcherTableau) -> ButcherTableau:
    """``tab`` with its collocation polynomial as dense output, where ``tab`` is a collocation
    method (Radau IIA, Gauss-Legendre); ``tab`` unchanged otherwise.

    A collocation method's stages are the values at ``c_j`` of the polynomial ``u`` of degree
    ``s`` with ``u(t0) = y0`` and ``u'(t0 + c_j h) = K_j``: ``u(t0 + theta h) = y0 + h sum_j
    K_j int_0^theta l_j``, ``l_j`` the Lagrange basis on the nodes. On a stiff problem it holds
    the stages, which the Newton solve made consistent with ``f``, where cubic Hermite
    extrapolates the end derivatives (measured: Robertson's kinetics, radauIIA5 at step 0.05,
    interpolating's dL/dy0 5% off with Hermite). It is the method's own continuous extension, of
    order ``s + 1`` between steps. The test: ``int_0^{c_i} l_j = a_ij`` for every stage and
    ``int_0^1 l_j = b_j``."""
    nodes = [j for j in range(tab.stages)
             if tab.b[j] != 0.0 or any(j < len(row) and row[j] != 0.0 for row in tab.a)]
    if len(nodes) < 2:
        # One stage (implicit Euler, implicit midpoint): the polynomial is the chord between the
        # step's ends, less accurate than cubic Hermite (midpoint's free fall: 0.15 off between
        # grid points, against round-off), so those keep Hermite.
        return tab
    dense = [[0.0] * len(nodes) for _ in range(tab.stages)]
    for j in nodes:
        poly = [1.0]  # l_j's coefficients, ascending powers of theta
        for m in nodes:
            if m != j:
                d = tab.c[j] - tab.c[m]
                poly = [((poly[k - 1] if k else 0.0) - tab.c[m] * (poly[k] if k < len(poly) else 0.0)) / d
                        for k in range(len(poly) + 1)]
        dense[j] = [coef / (p + 1) for p, coef in enumerate(poly)]  # int_0^theta, from theta**1

    def weight(j, theta):
        return sum(coef * theta ** (p + 1) for p, coef in enumerate(dense[j]))

    conditions = [(tab.c[i], tab.a[i]) for i in range(tab.stages)] + [(1.0, tab.b)]
    if any(abs(weight(j, theta) - (row[j] if j < len(row) else 0.0)) > 1e-12
           for theta, row in conditions for j in range(tab.stages)):
        return tab
    return replace(tab, dense=tuple(tuple(r) for r in dense))


def _implicit() -> tuple:
    """torchdiffeq's fixed-step implicit methods (rtqichen/torchdiffeq, fixed_grid_implicit.py),
    each with the explicit stage 0 prepended where its own first stage is implicit."""
    g = (2.0 - _S2) / 2.0  # SDIRK2's diagonal, L-stable
    gt, bt = 1.0 - _S2 / 2.0, _S2 / 4.0  # TR-BDF2 (Bank et al. 1985; Hosea & Shampine 1996)
    r6 = math.sqrt(6.0)
    tabs = (
        ButcherTableau(name="implicit_euler", order=1, c=(0.0, 1.0), a=((), (0.0, 1.0)), b=(0.0, 1.0)),
        ButcherTableau(name="implicit_midpoint", order=2, c=(0.0, 0.5), a=((), (0.0, 0.5)), b=(0.0, 1.0)),
        # Lobatto IIIA with two stages; its first stage is explicit already.
        ButcherTableau(name="trapezoid", order=2, c=(0.0, 1.0), a=((), (0.5, 0.5)), b=(0.5, 0.5)),
        ButcherTableau(name="radauIIA3", order=3, c=(0.0, 1 / 3, 1.0),
                       a=((), (0.0, 5 / 12, -1 / 12), (0.0, 3 / 4, 1 / 4)), b=(0.0, 3 / 4, 1 / 4)),
        ButcherTableau(
            name="radauIIA5", order=5, c=(0.0, (4.0 - r6) / 10, (4.0 + r6) / 10, 1.0),
            a=((),
               (0.0, (88.0 - 7.0 * r6) / 360, (296.0 - 169.0 * r6) / 1800, (-2.0 + 3.0 * r6) / 225),
               (0.0, (296.0 + 169.0 * r6) / 1800, (88.0 + 7.0 * r6) / 360, (-2.0 - 3.0 * r6) / 225),
               (0.0, (16.0 - r6) / 36, (16.0 + r6) / 36, 1 / 9)),
            b=(0.0, (16.0 - r6) / 36, (16.0 + r6) / 36, 1 / 9)),
        # Gauss-Legendre. torchdiffeq's gl4 lists c_2 = 1/2 - sqrt(3)/6 (the row sum is 1/2 + sqrt(3)/6);
        # the row sums are used here, which only matters for a non-autonomous func.
        ButcherTableau(name="gl4", order=4, c=(0.0, 0.5 - _S3 / 6, 0.5 + _S3 / 6), b=(0.0, 0.5, 0.5),
                       a=((), (0.0, 0.25, 0.25 - _S3 / 6), (0.0, 0.25 + _S3 / 6, 0.25))),
        ButcherTableau(
            name="gl6", order=6, c=(0.0, 0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10),
            a=((),
               (0.0, 5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
               (0.0, 5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
               (0.0, 5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36)),
            b=(0.0, 5 / 18, 4 / 9, 5 / 18)),
        ButcherTableau(name="sdirk2", order=2, c=(0.0, g, 1.0), a=((), (0.0, g), (0.0, 1.0 - g, g)),
                       b=(0.0, 1.0 - g, g)),
        ButcherTableau(name="trbdf2", order=2, c=(0.0, 2.0 * gt, 1.0), a=((), (gt, gt), (bt, bt, gt)),
                       b=(bt, bt, gt)),
    )
    return tuple(_collocation_dense(tab) for tab in tabs)


TABLEAUX = {tab.name: tab for tab in (
    ButcherTableau(name="euler", order=1, c=(0.0,), a=((),), b=(1.0,)),
    ButcherTableau(name="midpoint", order=2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0)),
    # torchdiffeq's "rk4" is Kutta's 3/8 rule; keep that so results match after an import swap.
    ButcherTableau(name="rk4", order=4, c=(0.0, 1 / 3, 2 / 3, 1.0), a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                   b=(1 / 8, 3 / 8, 3 / 8, 1 / 8)),
    _dopri5(),
    _tsit5(),
    _bosh3(),
    _adaptive_heun(),
    _dopri8(),
    _fehlberg2(),
    ButcherTableau(name="heun2", order=2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5)),
    ButcherTableau(name="heun3", order=3, c=(0.0, 1 / 3, 2 / 3), a=((), (1 / 3,), (0.0, 2 / 3)), b=(1 / 4, 0.0, 3 / 4)),
    *_implicit(),
)}
ADAPTIVE = tuple(k for k, v in TABLEAUX.items() if v.adaptive)
FIXED = tuple(k for k, v in TABLEAUX.items() if not v.adaptive)
IMPLICIT = tuple(k for k, v in TABLEAUX.items() if v.implicit)
