"""Adams-Bashforth(-Moulton) multistep methods on a fixed grid: torchdiffeq's ``explicit_adams``,
``implicit_adams`` and ``fixed_adams`` (torchdiffeq's older name for ``implicit_adams``).

A multistep step reads the derivatives at earlier grid points: :class:`AdamsStepper` keeps them
as its state and is stepped by the shared loop, :func:`~pyode_bridge.solvers.integrate`, on its
fixed grid (outputs at ``t_eval``, the quadrature ``q0``, ``on_step`` with a cubic Hermite
:class:`DenseStep`, step counts and errors as every method's).

The scheme is torchdiffeq's. The grid is ``options['grid']``, the uniform grid of ``step_size``, or
``t`` itself. Every step starts with ``f = rhs(t_n, y_n)``, prepended to a history of derivatives
at step starts that holds at most ``max_order - 1`` values. While it holds fewer than 3, the step
is rk4 (Kutta's 3/8 rule); then it is Adams-Bashforth of order ``k`` = the history length, so the
order ramps up by one per step. ``implicit_adams`` corrects that prediction with Adams-Moulton of
order ``k + 1`` by functional iteration (at most ``max_iters`` evaluations at ``t_{n+1}``) until
two successive increments agree to ``atol + rtol * |increment|`` in every component; if they never
do, the oldest history value is dropped (lower order next step) and a warning names the steps.

One deliberate difference: the coefficients follow the actual grid (variable-step Adams). On a
uniform grid they are torchdiffeq's constants; on a non-uniform one (a ``t`` or ``grid`` with
uneven spacing, a ``step_size`` grid with a shorter last step) the method keeps its order, where
constant coefficients would silently lose accuracy at every change of step size.

A second one: ``explicit_adams`` lowers its order, for the rest of the solve, wherever the
Adams-Bashforth increment's highest-order term is larger than the one below it (never below
Adams-Bashforth 4). Adams-Bashforth 11, torchdiffeq's default, is unstable for real ``h lambda``
outside (-0.0034, 0): on y' = -0.7 y at h = 0.01 its round-off grows by ~1.17 per step
(y(2.5) off by 3e5 in torchdiffeq). Growing top terms catch that while it is round-off; on smooth
solutions the terms fall with the order and nothing changes. The history restarts at every
``jump_t`` (derivatives across a jump of ``func`` do not extrapolate).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._types import RHS
from .boundaries import boundary_rhs, jumps_within, nudge
from .combine import combine
from .dense import DenseStep, HermiteDenseStep, PolynomialDenseStep
from .loop import FirstOf, LazyRHS, rk_step
from .method import SolverMethod
from .tableau import TABLEAUX
from .util import add_quadrature

if TYPE_CHECKING:
    from .config import SolverConfig

__all__ = ["AdamsMethod", "ADAMS_METHODS", "AdamsStepper", "AdamsStep", "adams_weights"]

MAX_ORDER = 12  # torchdiffeq's _MAX_ORDER: its coefficient tables stop there
_RK4 = TABLEAUX["rk4"]  # torchdiffeq's startup step (rk4_alt_step_func) is the 3/8 rule
# Gauss-Legendre on [0, 1], exact for the polynomials (degree <= MAX_ORDER - 1) integrated below.
_GX, _GW = np.polynomial.legendre.leggauss(8)
_GX, _GW = (_GX + 1.0) / 2.0, _GW / 2.0


@functools.lru_cache(maxsize=256)
def _uniform_weights(nodes: tuple) -> tuple:
    """Exact (rational) weights of :func:`adams_weights` for integer nodes, rounded once."""
    exact = [Fraction(x) for x in nodes]
    out = []
    for j, xj in enumerate(exact):
        poly, denom = [Fraction(1)], Fraction(1)  # prod_{m != j} (x - x_m), lowest power first
        for m, xm in enumerate(exact):
            if m != j:
                poly = [(poly[p - 1] if p > 0 else Fraction(0)) - (xm * poly[p] if p < len(poly) else 0)
                        for p in range(len(poly) + 1)]
                denom *= xj - xm
        out.append(float(sum(c / (p + 1) for p, c in enumerate(poly)) / denom))
    return tuple(out)


def adams_weights(nodes) -> list:
    """``w_j = integral_0^1 l_j(x) dx`` for the Lagrange basis ``l_j`` on ``nodes``.

    ``nodes`` are times relative to the step, ``x = (tau - t_n) / h``: ``[0, x_1, ...]`` for
    Adams-Bashforth (``x_j < 0`` the history), ``[1, 0, x_1, ...]`` for Adams-Moulton. Then
    ``y_{n+1} = y_n + h * sum_j w_j f(tau_j)`` integrates the interpolant of the derivatives over
    the step. Nodes within 1e-10 of ``0, -1, -2, ...`` (a uniform grid up to round-off) get the
    classical constants, computed exactly; others Gauss-Legendre quadrature of the basis.
    """
    nodes = [float(x) for x in nodes]
    ints = [round(x) for x in nodes]
    if max(abs(x - i) for x, i in zip(nodes, ints)) <= 1e-10 and len(set(ints)) == len(ints):
        return list(_uniform_weights(tuple(ints)))
    x = np.asarray(nodes)
    diff = x[:, None] - x[None, :]
    np.fill_diagonal(diff, 1.0)
    at_g = _GX[:, None] - x[None, :]  # (G, k); never 0: nodes are 1 or <= 0, Gauss points inside
    basis = at_g.prod(axis=1, keepdims=True) / at_g / diff.prod(axis=1)[None, :]
    return (_GW @ basis).tolist()


# explicit_adams never lowers its history below this many derivatives (Adams-Bashforth 4, the
# order AdamsMethod.order promises; stable for real h lambda in (-0.3, 0)).
_STABLE_HISTORY = 4


def _top_term_grows(x: list, w: list, hist_f: list) -> bool:
    """Whether the Adams-Bashforth increment's highest-order term (weights ``w`` on nodes ``x``
    minus those of one node fewer) is larger than the term below it (2-norm, one host sync).

    On a smooth solution these terms fall geometrically with the order, like the divided
    differences of f; a parasitic mode of an unstable order oscillates and its differences grow
    with the order, so the test catches it while it is still at round-off level. Where both terms
    are round-off, lowering the order changes nothing the highest one contributed."""
    w1, w2 = adams_weights(x[:-1]), adams_weights(x[:-2])
    with torch.no_grad():
        top = combine(None, [(a - b, v.detach()) for a, b, v in zip(w, w1 + [0.0], hist_f)])
        below = combine(None, [(a - b, v.detach()) for a, b, v in zip(w1, w2 + [0.0], hist_f)])
        if top is None or below is None:
            return False
        n_top, n_below = torch.stack([torch.linalg.vector_norm(top),
                                      torch.linalg.vector_norm(below)]).tolist()
    return n_top > n_below


def _converged(dy_old: torch.Tensor, dy: torch.Tensor, rtol: float, atol: float) -> bool:
    """torchdiffeq's corrector test: ``|dy - dy_old| <= atol + rtol * max(|dy|, |dy_old|)`` in
    every component (the max norm; NaN never converges)."""
    with torch.no_grad():
        a, b = dy_old.detach(), dy.detach()
        tol = torch.maximum(a.abs(), b.abs()).mul_(rtol).add_(atol)
        return bool(((a - b).abs() <= tol).all())


@dataclass(eq=False)
class AdamsStep:
    """One attempted Adams step from ``(t0, y0)`` to ``t1`` (what :meth:`AdamsStepper.attempt`
    returns): ``y_new`` ``(N,)``, ``dq`` ``(Q,)`` or None, ``q1`` the quadrature after it (set when
    it is accepted); the history it leaves, newest first (``hist``: step start times, ``dy``
    ``(N,)`` and ``dq`` ``(Q,)`` there) with its length cap, whether the corrector converged, and
    ``f_next``, the next step's first derivative (evaluated on first use)."""

    t0: float
    t1: float
    y0: torch.Tensor
    y_new: torch.Tensor
    dq: torch.Tensor | None
    hist: tuple[list, list, list]
    cap: int
    converged: bool
    f_next: LazyRHS
    interp: str | None
    q1: torch.Tensor | None = None
    _dense: DenseStep | None = None

    def dense(self) -> DenseStep:
        """The step's continuous extension, built on first use: cubic Hermite (``interp`` None or
        ``"cubic"``; its end derivative is ``f_next``) or linear (``"linear"``)."""
        if self._dense is None:
            h = self.t1 - self.t0
            # f_next returns (dy, dq) exactly where a quadrature rides along (dq is not None).
            f1 = FirstOf(self.f_next) if self.dq is not None else self.f_next
            self._dense = (PolynomialDenseStep(self.t0, h, self.y0, self.y_new, [self.y_new - self.y0])
                           if self.interp == "linear" else
                           HermiteDenseStep(self.t0, h, self.y0, self.y_new, self.hist[1][0], f1))
        return self._dense


class AdamsStepper:
    """The stepper of an Adams method on the shared loop (the contract of
    :class:`~pyode_bridge.solvers.method.Stepper`): its state is ``y``, ``q``, the first
    derivative of the next step and the history of derivatives at earlier step starts.

    The grid is fixed, so the tolerances only steer the corrector (``config.control.atol`` in the
    state's units: an adjoint's tolerance scale ``atol`` does not apply) and ``first_stage`` is
    unused: the first derivative is evaluated here, just after a step start where ``perturb`` or a
    ``jump_t`` asks for it, as the end of every step is evaluated just before."""

    def __init__(self, rhs: RHS, method: AdamsMethod, config: SolverConfig, y0: torch.Tensor,
                 q0: torch.Tensor | None, first_stage: Any, atol: float | torch.Tensor, t_start: float,
                 t_end: float, context: str) -> None:
        self.rhs, self.method, self.config, self.context = rhs, method, config, context
        self.quad = q0 is not None
        self.y, self.q, self.q0 = y0, q0, q0
        self.direction = 1.0 if t_end >= t_start else -1.0
        self.jumps = jumps_within(config.time.jump_t, t_start, t_end)
        self.on_attempt = config.callbacks.step if config.callbacks is not None else None
        self.cap = max(1, method.max_order - 1)  # explicit: lowered for good where the order diverges
        self.hist: tuple[list, list, list] = ([], [], [])  # newest first: step start times, dy and dq
        self.not_converged: list[float] = []
        self.steps = 0
        self.f = self._derivative(t_start, y0)

    def _derivative(self, t: float, y: torch.Tensor) -> LazyRHS:
        # With perturb, or after a jump of func, a step's first derivative is taken just after t.
        moved = self.config.time.perturb or t in self.jumps
        return LazyRHS(self.rhs, nudge(t, self.direction, self.config.time.dtype) if moved else t, y)

    def first_stage(self) -> Any:
        """``rhs`` at the start of the next step (evaluated now if it is not yet)."""
        return self.f()

    def attempt(self, t0: float, t1: float) -> AdamsStep:
        """One step from the current state at ``t0`` to ``t1``: rk4 while the history holds fewer
        than 3 derivatives, then Adams-Bashforth (and the Adams-Moulton corrector)."""
        method, config, quad, y, h = self.method, self.config, self.quad, self.y, t1 - t0
        if self.on_attempt is not None:
            self.on_attempt(t0, y, h)
        cap = self.cap
        # Derivatives from before a jump of func do not extrapolate past it: restart (rk4).
        keep = 0 if t0 in self.jumps else cap - 1
        srhs = boundary_rhs(self.rhs, t0, t1, config.time.dtype, False,
                            config.time.perturb or t1 in self.jumps)
        f0 = self.f()
        hist_t, hist_f, hist_g = ([t0] + self.hist[0][:keep], [f0[0] if quad else f0] + self.hist[1][:keep],
                                  [f0[1]] + self.hist[2][:keep] if quad else [])
        # dq is None exactly when quad is False, an invariant the checker cannot follow through the
        # `if quad:` branches below, so the step's quadrature increment is left untyped.
        dq: Any = None
        k, converged = len(hist_f), True
        if k < 3:
            y_new, _, dqs, _ = rk_step(srhs, _RK4, t0, y, f0, h, quad=quad)
            dq = combine(None, [(h * b, d) for b, d in zip(_RK4.b, dqs)]) if dqs is not None else None
        else:
            x = [(s - t0) / h for s in hist_t]
            w = adams_weights(x)
            if not method.implicit and k > _STABLE_HISTORY and _top_term_grows(x, w, hist_f):
                # The highest-order term outgrows the one below it: a parasitic root of this
                # Adams-Bashforth order is amplifying round-off (AB11 for real h lambda < -0.0034), or
                # the derivatives are not smooth at this h. One order less, for the rest of the solve.
                cap = k = k - 1
                del hist_t[k:], hist_f[k:], hist_g[k:]
                x, w = x[:k], adams_weights(x[:k])
            dy = combine(None, [(h * c, v) for c, v in zip(w, hist_f)])
            if quad and not method.implicit:
                dq = combine(None, [(h * c, v) for c, v in zip(w, hist_g)])
            if method.implicit:
                w = adams_weights([1.0] + x)
                delta = combine(None, [(h * c, v) for c, v in zip(w[1:], hist_f)])
                for _ in range(method.max_iters):
                    f1 = srhs(t1, y + dy)
                    dy_old, dy = dy, torch.add(delta, f1[0] if quad else f1, alpha=h * w[0])
                    converged = _converged(dy_old, dy, config.control.rtol, config.control.atol)
                    if converged:
                        break
                if quad:  # the corrector's formula, with the last evaluation's dq
                    dq = torch.add(combine(None, [(h * c, v) for c, v in zip(w[1:], hist_g)]), f1[1],
                                   alpha=h * w[0])
                if not converged:
                    # As torchdiffeq: forget the oldest derivative, so the next step is one order lower.
                    del hist_t[-1], hist_f[-1], hist_g[-1:]
            y_new = y + dy
        return AdamsStep(t0, t1, y, y_new, dq, (hist_t, hist_f, hist_g), cap, converged,
                         self._derivative(t1, y_new), config.interp)

    def accept(self, step: AdamsStep) -> None:
        """Advance the state to the end of the accepted ``step`` (sets its ``q1``)."""
        self.y, self.f, self.hist, self.cap = step.y_new, step.f_next, step.hist, step.cap
        self.steps += 1
        if not step.converged:
            self.not_converged.append(step.t0)
        if step.dq is not None:
            self.q = step.q1 = add_quadrature(self.q, self.q0, step.dq)

    def finish(self) -> None:
        """Warn where the Adams-Moulton corrector did not converge (its steps lost an order). No
        derivative is carried out: a step starts from the history, which no replay is given."""
        if self.not_converged:
            warnings.warn(
                f"{self.context} with method '{self.method.name}': the Adams-Moulton corrector did not "
                f"converge within max_iters={self.method.max_iters} in {len(self.not_converged)} of "
                f"{self.steps} steps (first at t={self.not_converged[0]:.6g}); the solution may be "
                "inaccurate. Use a smaller step_size, raise options['max_iters'], or loosen rtol/atol.",
                RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class AdamsMethod(SolverMethod):
    """An Adams-Bashforth (``implicit=False``) or Adams-Bashforth-Moulton method.

    Attributes:
        name: the ``method=`` name.
        implicit: iterate the Adams-Moulton corrector after the Adams-Bashforth predictor.
        max_order: history length + 1 (4..12; ``options['max_order']``, torchdiffeq's default 12).
            Below 4 every step is rk4.
        max_iters: corrector evaluations per step (``options['max_iters']``, default 4).
    """

    name: str
    implicit: bool
    max_order: int = MAX_ORDER
    max_iters: int = 4

    adaptive = False
    OPTIONS = ("max_order", "max_iters")
    stepper = AdamsStepper

    @property
    def order(self) -> int:
        """Global order on a uniform grid. A fixed number of startup steps (rk4, then one Adams
        step with a 3-value history) bounds it, however high the order ramps afterwards: the
        explicit one's Adams-Bashforth 3 step (local error O(h^4)) gives 4; the implicit one's
        first corrector is of order 4 (local O(h^5)), so 5. With ``max_order=4`` the history stays
        at 3 values: 3 and 4. Below 4 it is rk4's 4."""
        if self.max_order < 4:
            return 4
        if self.max_order == 4:
            return 4 if self.implicit else 3
        return 5 if self.implicit else 4

    def with_options(self, options: dict) -> "AdamsMethod":
        max_order = options.pop("max_order", self.max_order)
        max_iters = options.pop("max_iters", self.max_iters)
        if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= MAX_ORDER:
            raise ValueError(f"options['max_order'] for method {self.name!r} must be an integer from "
                             f"1 to {MAX_ORDER}, got {max_order!r}")
        if max_order < 4:
            warnings.warn(f"options['max_order']={max_order} is below 4, so method {self.name!r} "
                          "reduces to 'rk4' (every step is an rk4 step).", UserWarning, stacklevel=4)
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"options['max_iters'] for method {self.name!r} must be a positive "
                             f"integer, got {max_iters!r}")
        return replace(self, max_order=max_order, max_iters=max_iters)


ADAMS_METHODS = {
    "explicit_adams": AdamsMethod("explicit_adams", implicit=False),
    "implicit_adams": AdamsMethod("implicit_adams", implicit=True),
    "fixed_adams": AdamsMethod("fixed_adams", implicit=True),
}
