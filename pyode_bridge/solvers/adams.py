"""Adams-Bashforth(-Moulton) multistep methods on a fixed grid: torchdiffeq's ``explicit_adams``,
``implicit_adams`` and ``fixed_adams`` (torchdiffeq's older name for ``implicit_adams``).

A multistep step reads the derivatives at earlier grid points, so these methods do not fit the
Runge-Kutta loop; :func:`integrate_adams` is their loop, with the contract of
:func:`~pyode_bridge.solvers.integrate` (outputs at ``t_eval``, the quadrature ``q0``, ``on_step``
with a cubic Hermite :class:`DenseStep`, step counts, the same error messages).

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
from typing import Any

import numpy as np
import torch

from .boundaries import StepCallbacks, boundary_rhs, jumps_within, nudge
from .combine import combine
from .dense import HermiteDenseStep, PolynomialDenseStep
from .loop import IntegrateResult, make_grid, rk_step
from .method import SolverMethod
from .tableau import TABLEAUX
from .util import collect_outputs, fail

__all__ = ["AdamsMethod", "ADAMS_METHODS", "integrate_adams", "adams_weights"]

MAX_ORDER = 12  # torchdiffeq's _MAX_ORDER: its coefficient tables stop there
_RK4 = TABLEAUX["rk4"]  # torchdiffeq's startup step (rk4_alt_step_func) is the 3/8 rule
# Gauss-Legendre on [0, 1], exact for the polynomials (degree <= MAX_ORDER - 1) integrated below.
_GX, _GW = np.polynomial.legendre.leggauss(8)
_GX, _GW = (_GX + 1.0) / 2.0, _GW / 2.0


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

    def integrate(self, rhs, y0, t_eval, config, *, q0=None, q_splits=None, atol_scale=1.0,
                  q_atol_scale=1.0, on_step=None, context="forward solve", check_finite_every_step=None):
        # Fixed grid: the tolerances only steer the corrector iterations (atol there in the
        # state's units), so the adjoint's tolerance scales do not apply.
        return integrate_adams(self, rhs, y0, t_eval, config, q0=q0, on_step=on_step,
                               context=context, check_finite_every_step=check_finite_every_step)


ADAMS_METHODS = {
    "explicit_adams": AdamsMethod("explicit_adams", implicit=False),
    "implicit_adams": AdamsMethod("implicit_adams", implicit=True),
    "fixed_adams": AdamsMethod("fixed_adams", implicit=True),
}


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


class _Derivative:
    """``rhs(t, y)`` evaluated once on first use: the end derivative of a step's Hermite dense
    output is the next step's first derivative."""

    def __init__(self, rhs, t, y, quad):
        self.rhs, self.t, self.y, self.quad, self.value = rhs, t, y, quad, None

    def __call__(self):
        if self.value is None:
            self.value = self.rhs(self.t, self.y)
        return self.value

    def dy(self):
        v = self()
        return v[0] if self.quad else v


def integrate_adams(method: AdamsMethod, rhs, y0, t_eval, config, *, q0=None, on_step=None,
                    context: str = "forward solve", check_finite_every_step: bool | None = None,
                    ) -> IntegrateResult:
    """Integrate ``dy/dt = rhs(t, y)`` with an Adams method on a fixed grid.

    Same arguments and result as :func:`~pyode_bridge.solvers.integrate` (``y0`` flat ``(N,)``,
    ``q0`` optional ``(Q,)`` with ``rhs`` then returning ``(dy, dq)``; the quadrature follows the
    same multistep formula, with the derivatives at the same points, and never feeds back).
    Differentiable by autograd (backprop); the corrector's convergence test is not.
    """
    quad = q0 is not None
    t_start, t_end = float(t_eval[0]), float(t_eval[-1])
    direction = 1.0 if t_end >= t_start else -1.0
    if check_finite_every_step is None:
        check_finite_every_step = y0.device.type == "cpu"
    blocks = [y0]  # outputs as collect_outputs appends them
    result = IntegrateResult(q_end=q0, step_times=[t_start], blocks=blocks)
    n_eval = len(t_eval)
    if n_eval == 1 or t_start == t_end:
        return result
    grid = make_grid(t_start, t_end, config.time.step_size, config.time.grid, t_eval,
                     constructor=config.time.grid_constructor, rhs=rhs, y0=y0,
                     stops=tuple(config.time.step_t) + tuple(config.time.jump_t),
                     max_num_steps=config.control.max_num_steps, context=context, method=method)

    cap = max(1, method.max_order - 1)  # explicit: lowered for good where the order diverges
    # newest first: step start times, dy and dq there
    hist_t: list[float] = []
    hist_f: list[torch.Tensor] = []
    hist_g: list[torch.Tensor] = []
    not_converged = []
    callbacks = config.callbacks or StepCallbacks()
    jumps = jumps_within(config.time.jump_t, t_start, t_end)
    dtype = config.time.dtype

    def start_derivative(ts, ys_):
        # With perturb, or after a jump of func, the step's first derivative is taken just after ts.
        moved = config.time.perturb or ts in jumps
        return _Derivative(rhs, nudge(ts, direction, dtype) if moved else ts, ys_, quad)

    # dq is None exactly when quad is False, an invariant the checker cannot follow through the
    # `if quad:` branches below, so the step's quadrature increment is left untyped.
    dq: Any
    t, y, q = t_start, y0, q0
    f = start_derivative(t, y)
    next_out = 1
    for gi in range(1, len(grid)):
        t1 = grid[gi]
        h = t1 - t
        if callbacks.step is not None:
            callbacks.step(t, y, h)
        if t in jumps:
            # Derivatives from before a jump of func do not extrapolate past it: restart (rk4).
            del hist_t[:], hist_f[:], hist_g[:]
        srhs = boundary_rhs(rhs, t, t1, dtype, False, config.time.perturb or t1 in jumps)
        f0 = f()
        hist_t.insert(0, t)
        hist_f.insert(0, f0[0] if quad else f0)
        if quad:
            hist_g.insert(0, f0[1])
        del hist_t[cap:], hist_f[cap:], hist_g[cap:]
        k = len(hist_f)
        if k < 3:
            y_new, _, dqs, _ = rk_step(srhs, _RK4, t, y, f0, h, quad=quad)
            dq = combine(None, [(h * b, d) for b, d in zip(_RK4.b, dqs)]) if dqs is not None else None
        else:
            x = [(s - t) / h for s in hist_t]
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
                    not_converged.append(t)
                    del hist_t[-1], hist_f[-1]
                    if quad:
                        del hist_g[-1]
            y_new = y + dy
        last_step = gi == len(grid) - 1
        if (check_finite_every_step or last_step) and not bool(torch.isfinite(y_new).all()):
            raise fail(f"the state became NaN/Inf between t={t:.6g} and t={t1:.6g}; use a smaller "
                       "step_size or an adaptive method, or check func.", context, method)

        result.steps += 1
        result.step_times.append(t1)
        f_next = start_derivative(t1, y_new)
        next_out, step = collect_outputs(
            blocks, t_eval, next_out, t, t1, direction, y_new,
            lambda: _dense(config, t, h, y, y_new, hist_f[0], f_next.dy),
            check_finite=check_finite_every_step, context=context, method=method)
        stop = on_step is not None and on_step(
            step if step is not None else _dense(config, t, h, y, y_new, hist_f[0], f_next.dy)) is True
        if quad:
            if check_finite_every_step and not bool(torch.isfinite(dq).all()):
                raise fail(f"the integrated parameter gradient became NaN/Inf between t={t:.6g} and "
                           f"t={t1:.6g}; check func (its vector-Jacobian product) or lower the "
                           "scale of the loss.", context, method)
            q = q.add_(dq) if (q is not q0 and not torch.is_grad_enabled()) else q + dq
        t, y, f = t1, y_new, f_next
        if stop:  # on_step ended the solve (an event was found)
            break

    result.q_end = q
    if not check_finite_every_step:
        tail = blocks[1:] + ([q] if quad else [])
        if not bool(torch.stack([torch.isfinite(v).all() for v in tail]).all()):
            raise fail(f"the solution became NaN/Inf between t={t_start:.6g} and t={t_end:.6g}; "
                       "use a smaller step_size or an adaptive method, or check func.", context, method)
    if not_converged:
        warnings.warn(
            f"{context} with method '{method.name}': the Adams-Moulton corrector did not converge "
            f"within max_iters={method.max_iters} in {len(not_converged)} of {result.steps} steps "
            f"(first at t={not_converged[0]:.6g}); the solution may be inaccurate. Use a smaller "
            "step_size, raise options['max_iters'], or loosen rtol/atol.", RuntimeWarning, stacklevel=2)
    return result



def _dense(config, t, h, y, y_new, f0, f1):
    """An Adams step's continuous extension: cubic Hermite (``interp`` None or ``"cubic"``) or
    linear (``"linear"``); ``f1`` may be lazy."""
    if config.interp == "linear":
        return PolynomialDenseStep(t, h, y, y_new, [y_new - y])
    return HermiteDenseStep(t, h, y, y_new, f0, f1)
