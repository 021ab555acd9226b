"""The stepping loop shared by the forward solve and every backward (adjoint) solve.

Times are Python floats: step acceptance needs exactly one host sync per step (the error ratio);
nothing else leaves the device. Accepted step sizes are plain floats, so they are constants of the
discrete map and are never differentiated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import SolverError
from .boundaries import StepCallbacks, boundary_rhs, jumps_within, stops_between
from .combine import StageRow, combine_stages
from .controller import PIController, error_ratio, initial_step, quadrature_error_ratio
from .dense import DenseStep, HermiteDenseStep, PolynomialDenseStep, RKDenseStep
from .implicit import implicit_rk_step
from .method import SolverMethod
from .tableau import ButcherTableau

__all__ = ["SolverConfig", "IntegrateResult", "integrate", "rk_step", "dense_step", "make_grid", "RHS",
           "StepOutput"]

# The right-hand side of a flat solve: ``rhs(t, y (N,)) -> dy (N,)``, or ``(dy (N,), dq (Q,))`` when
# a quadrature rides along (integrate's ``q0``). Which of the two is fixed per solve, not per call,
# so the return is left open here rather than a Union every caller would have to narrow.
RHS = Callable[[float, Tensor], Any]
# rk_step's result: ``(y_new (N,), ks [(N,)] * S, dqs [(Q,)] * S or None, f_new)``; ``f_new`` is
# the FSAL derivative at the new state (shaped like an ``rhs`` return) or None.
StepOutput = tuple[Tensor, list, Optional[list], Any]


@dataclass
class SolverConfig:
    """Everything that defines the discrete solve except the right-hand side and the data.

    ``grid`` (a list of times) makes the solve fixed-step on exactly those step boundaries; this is
    also how adjoint methods replay a recorded adaptive step sequence. ``step_size`` builds a
    uniform grid for fixed-step tableaux, ``grid_constructor(func, y0, t) -> times`` any grid
    (torchdiffeq's option; called per solve, so a backward solve calls it for its own interval).
    ``norm_splits``: the sizes of a tuple state's parts, each error-controlled on its own (see
    :func:`~pyode_bridge.solvers.error_ratio`).
    ``seminorm``: leave an integrated quadrature (an adjoint's parameter integral) out of the error
    norm (torchdiffeq's ``adjoint_options={"norm": "seminorm"}``). Cheaper backward solves, but the
    parameter gradient is then only as accurate as the step sequence chosen for the adjoint state
    happens to make it: a parameter integrand faster than the adjoint is under-resolved.
    ``newton_tol``, ``max_newton_iters``, ``jacobian``: Newton's method of implicit tableaux
    (:mod:`~pyode_bridge.solvers.implicit`).
    ``norm``: the error norm, ``norm(e_y (N,), e_q (Q,) or None) -> 0-d tensor`` of the error
    estimate scaled by ``atol + rtol * max(|y0|, |y1|)`` (``e_q``: the quadrature's, or None when it
    is not error-controlled); None is the built-in RMS per part (``norm_splits``, ``q_splits``).
    ``adjoint_norm``: a backward solve's norm in torchdiffeq's convention, called with
    ``(t, *y_parts, *adj_y_parts, *adj_params)``; the adjoint methods turn it into their ``norm``.
    ``step_t``: times adaptive steps land on; ``jump_t``: the same, and ``func`` is discontinuous
    there: the step ending at one sees ``func`` just before it, the step starting there just after.
    ``perturb``: every step evaluates ``func`` just inside its ends, never at a step boundary
    (torchdiffeq's ``perturb=True``). ``min_step``: adaptive steps are never shorter (a step of
    that size is accepted whatever its error). ``interp``: the continuous extension between step
    boundaries: ``None`` the method's own (cubic Hermite where it has none), ``"cubic"`` cubic
    Hermite, ``"linear"`` linear. ``callbacks``: a
    :class:`~pyode_bridge.solvers.boundaries.StepCallbacks`.
    ``compile``: ``torch.compile`` keywords of the opt-in compiled step (see
    :mod:`~pyode_bridge.solvers.compiled`; the solve's right-hand side carries the compiled step).
    ``cuda_graph``: capture the fixed-grid solve as CUDA graphs
    (:mod:`~pyode_bridge.solvers.cuda_graph`).
    """

    tableau: ButcherTableau | SolverMethod
    rtol: float = 1e-7
    atol: float = 1e-9
    first_step: float | None = None
    max_step: float = math.inf
    max_num_steps: int = 10_000
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    beta: float | None = None
    step_size: float | None = None
    grid: list | None = None
    time_dtype: torch.dtype | None = None
    norm_splits: tuple | None = None
    seminorm: bool = False
    newton_tol: float | None = None
    max_newton_iters: int = 10
    jacobian: str = "auto"
    norm: Callable | None = None
    adjoint_norm: Callable | None = None
    step_t: tuple = ()
    jump_t: tuple = ()
    perturb: bool = False
    grid_constructor: Callable | None = None
    min_step: float = 0.0
    interp: str | None = None
    callbacks: StepCallbacks | None = None
    compile: dict | None = None
    cuda_graph: bool = False
    # Set by ``replay(grid, exact=True)``: a replay that repeats a recorded solve step for step to
    # differentiate it (checkpointed). ``carry_last``: the recorded solve was adaptive and carried
    # each step's last stage (ButcherTableau.carry_last), so the replay carries it too.
    # ``lean_fsal``: a step leaves out its FSAL last stage where nothing reads it (no error control,
    # no output inside the step, no next step starting from it).
    carry_last: bool = False
    lean_fsal: bool = False

    @property
    def adaptive(self) -> bool:
        return (self.tableau.adaptive and self.grid is None and self.step_size is None
                and self.grid_constructor is None)

    def replay(self, grid: Sequence[float], exact: bool = False) -> "SolverConfig":
        """The same tableau stepping exactly on ``grid`` (no error control, no callbacks; the
        ``jump_t``/``perturb`` evaluations are kept, so the replay is the recorded solve).
        ``exact``: also carry stages as the recorded solve did (``carry_last``) and skip FSAL stages
        nothing reads (``lean_fsal``); a segment after the first then starts from the recorded
        derivative (``integrate(first_stage=...)``)."""
        carry = exact and self.adaptive and getattr(self.tableau, "carry_last", False)
        return replace(self, grid=list(grid), step_size=None, grid_constructor=None, callbacks=None,
                       carry_last=carry, lean_fsal=exact)

    def with_tolerances(self, rtol: float | None = None, atol: float | None = None) -> "SolverConfig":
        """The same configuration with ``rtol``/``atol`` replaced where given."""
        return replace(self, rtol=self.rtol if rtol is None else rtol,
                       atol=self.atol if atol is None else atol)


class IntegrateResult:
    """Output of :func:`integrate`: states at ``t_eval``, the quadrature at the final time, the
    accepted step boundaries, and step counts.

    Attributes:
        ys: the states at ``t_eval``, a list of ``(N,)`` tensors.
        q_end: the quadrature at ``t_eval[-1]`` (or ``None``).
        step_times: the accepted step boundaries, from ``t_eval[0]`` to ``t_eval[-1]``.
        steps, rejected: accepted and rejected step counts.
        next_step: adaptive solves: the step size (magnitude) the controller would take after
            ``t_eval[-1]``, to continue into a following interval without a fresh initial-step
            estimate (the larger of its proposal and the step the last one was cut short from).
        carried: the derivative a step after ``t_eval[-1]`` would start from (FSAL,
            ``carry_last``, a Hermite end derivative already evaluated), or None.
        blocks: where the stepping loop filled it, the same states as they were computed:
            ``(N,)`` tensors and ``(K, N)`` blocks of dense output. ``ys`` is then built from it
            on first access (1000 output times as 1000 autograd views cost more than the solve),
            and :meth:`stacked` joins the blocks directly, one autograd node per block.
    """

    def __init__(self, ys: list[Tensor] | None = None, q_end: Tensor | None = None,
                 step_times: list[float] | None = None, steps: int = 0, rejected: int = 0,
                 blocks: list[Tensor] | None = None) -> None:
        if ys is None and blocks is None:
            ys = []
        self._ys, self.blocks = ys, blocks
        self.q_end = q_end
        self.step_times = [] if step_times is None else step_times
        self.steps, self.rejected = steps, rejected
        self.next_step: float | None = None
        self.carried: Any = None

    @property
    def ys(self) -> list[Tensor]:
        if self._ys is None:
            assert self.blocks is not None  # the constructor sets one of the two
            self._ys = [r for b in self.blocks for r in (b.unbind(0) if b.dim() == 2 else (b,))]
        return self._ys

    def stacked(self) -> torch.Tensor:
        """The states at ``t_eval`` as one ``(T, N)`` tensor."""
        if self.blocks is None:
            return torch.stack(self.ys)
        if all(b.dim() == 1 for b in self.blocks):
            return torch.stack(self.blocks)
        return torch.cat([b if b.dim() == 2 else b.unsqueeze(0) for b in self.blocks])


def make_grid(t_start: float, t_end: float, step_size: float | None, grid: Sequence[float] | None,
              t_eval: Sequence[float], *, constructor: Callable | None = None, rhs: RHS | None = None,
              y0: Tensor | None = None, stops: Sequence[float] = (), max_num_steps: int | None = None,
              context: str = "forward solve",
              method: ButcherTableau | SolverMethod | None = None) -> list[float]:
    """Step boundaries of a fixed-step solve from ``t_start`` to ``t_end``: ``grid``, else
    ``constructor(func, y0, t)`` (torchdiffeq's ``grid_constructor``; ``func(t, y)`` is ``rhs``,
    ``t`` a float64 tensor of ``t_eval``), else the uniform grid of ``step_size``, else ``t_eval``;
    with the times ``stops`` (``step_t``, ``jump_t``) added where they fall inside.

    With ``max_num_steps``, a grid of more steps raises :class:`SolverError` (``context`` and
    ``method``, a tableau or method with a ``name``, name the solve) before it is built: the
    step count of ``step_size`` and of a constructed grid is known from its size alone."""
    def check(n: int, what: str) -> None:
        if max_num_steps is not None and n > max_num_steps:
            raise _fail(f"{what} from t={t_start:.6g} to t={t_end:.6g} has {n} steps, more than "
                        f"max_num_steps={max_num_steps}; raise options={{'max_num_steps': ...}} or use "
                        "fewer steps (a larger step_size, a coarser grid).", context, method)

    if grid is not None:
        check(len(grid) - 1, "the fixed grid (options['grid'])")
        g = [float(x) for x in grid]
        if g[0] != t_start or g[-1] != t_end:
            raise ValueError(f"options['grid'] must start at t[0]={t_start} and end at t[-1]={t_end}; "
                             f"got {g[0]} .. {g[-1]}")
    elif constructor is not None:
        g = _constructed_grid(constructor, rhs, y0, t_eval, check)
    elif step_size is None:
        check(len(t_eval) - 1, "the fixed grid of the output times t")
        g = [float(x) for x in t_eval]
    else:
        span = t_end - t_start
        h = math.copysign(abs(step_size), span)
        # A relative slack avoids a spurious tiny last step when span / h is an integer up to round-off.
        n = max(1, math.ceil(span / h - 1e-9))
        check(n, f"the fixed grid of step_size={abs(step_size):.6g}")
        g = [t_start + k * h for k in range(n)] + [t_end]
    inside = stops_between(stops, t_start, t_end)
    if inside:
        sign = 1.0 if t_end >= t_start else -1.0
        g = sorted(set(g) | set(inside), key=lambda x: sign * x)
        check(len(g) - 1, "the fixed grid with the step_t/jump_t times added")
    return g


def _constructed_grid(constructor, rhs, y0, t_eval, check) -> list:
    """The grid a user's ``grid_constructor`` returns, checked (1-D, strictly monotone in the
    direction of ``t_eval``, from its first to its last time; the ends are snapped to them when they
    agree to the grid's own precision; ``check(steps, what)``, its step count, before any list of
    it is made)."""
    device = y0.device if isinstance(y0, torch.Tensor) else None
    t = torch.tensor([float(x) for x in t_eval], dtype=torch.float64, device=device)
    func = (lambda tt, yy, **kwargs: rhs(float(tt), yy)) if rhs is not None else None
    out = constructor(func, y0, t)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out, dtype=torch.float64)
    if out.dim() != 1 or out.numel() < 2 or not out.is_floating_point():
        raise ValueError(f"options['grid_constructor'] must return a 1-D floating tensor of at least two "
                         f"times, got {out.dtype} of shape {tuple(out.shape)}")
    check(out.numel() - 1, "the grid of options['grid_constructor']")
    g = [float(x) for x in out.detach().cpu().tolist()]
    t_start, t_end = float(t_eval[0]), float(t_eval[-1])
    slack = 8 * torch.finfo(out.dtype).eps * max(abs(t_start), abs(t_end), abs(t_end - t_start))
    if abs(g[0] - t_start) > slack or abs(g[-1] - t_end) > slack:
        raise ValueError(f"options['grid_constructor'] returned a grid from {g[0]} to {g[-1]}, but it "
                         f"must start at t[0]={t_start} and end at t[-1]={t_end} (it is called with "
                         "t and must return the step boundaries between its first and last time)")
    g[0], g[-1] = t_start, t_end
    sign = 1.0 if t_end >= t_start else -1.0
    if any(sign * (b - a) <= 0 for a, b in zip(g, g[1:])):
        raise ValueError("options['grid_constructor'] returned a grid that is not strictly "
                         f"{'increasing' if sign > 0 else 'decreasing'} (the direction of t)")
    return g


def rk_step(rhs: RHS, tab: ButcherTableau, t: float, y: Tensor, f0: Any, h: float, *, quad: bool = False,
            eval_last: bool = True, config: SolverConfig | None = None, context: str | None = None,
            atol: float | Tensor | None = None, rows: _StageRows | None = None) -> StepOutput:
    """One Runge-Kutta step from ``(t, y)`` with first stage ``f0 = rhs(t, y)``.

    With ``quad`` the right-hand side returns ``(dy, dq)`` and the ``dq`` parts are only integrated
    with the weights ``b`` (they never feed back into the stages: the adjoint's parameter integral).
    Returns ``(y_new, ks, dqs, f_new)`` where ``dqs`` is the list of the stages' ``dq`` (or ``None``;
    :func:`integrate` weights them with ``b`` for the increment and ``b_err`` for its error) and
    ``f_new`` is ``rhs(t + h, y_new)`` for FSAL tableaux (else ``None``).
    ``eval_last=False`` skips an FSAL tableau's last stage (it only serves the error estimate, the
    dense output and the next step): ``ks`` then has ``stages - 1`` entries and ``f_new`` is None.
    An implicit tableau's step solves its stage equations by Newton's method with ``config``'s
    tolerances and Newton options (``atol``, a float or a tensor ``(N,)``, replaces ``config.atol``;
    ``context`` names the solve in its errors). ``rows``: ``stage_rows(tab)``, if the caller has it.
    """
    if tab.implicit:
        return implicit_rk_step(rhs, tab, t, y, f0, h, quad=quad, config=config, context=context,
                                atol=atol)
    compiled = getattr(rhs, "compiled", None)
    if compiled is not None and not quad:  # options={"compile": ...}; f0 may then be None
        return compiled.step(rhs, tab, t, y, f0, h, eval_last)
    if quad:
        ks, dqs = [f0[0]], [f0[1]]
    else:
        ks, dqs = [f0], []
    y_new, f_new = None, None
    last = tab.stages - 1
    if rows is None:
        rows = stage_rows(tab)
    fsal, c, a = tab.fsal, tab.c, rows.a
    for i in range(1, last + 1):
        yi = combine_stages(y, ks, a[i], h)
        if fsal and i == last and not eval_last:
            y_new = yi
            break
        fi = rhs(t + c[i] * h, yi)
        if fsal and i == last:
            y_new, f_new = yi, fi
        if quad:
            ks.append(fi[0])
            dqs.append(fi[1])
        else:
            ks.append(fi)
    if y_new is None:
        y_new = combine_stages(y, ks, rows.b, h)
    return y_new, ks, (dqs if quad else None), f_new


class _StageRows:
    """A tableau's rows as :class:`StageRow` objects (``a[i]`` per stage, ``b``, ``b_err``)."""

    def __init__(self, tab: ButcherTableau) -> None:
        self.a = [StageRow(row) for row in tab.a]
        self.b = StageRow(tab.b)
        self.b_err = StageRow(tab.b_err) if tab.b_err is not None else None


_ROWS: dict[int, tuple[ButcherTableau, _StageRows]] = {}


def stage_rows(tab: ButcherTableau) -> _StageRows:
    """The cached :class:`_StageRows` of ``tab`` (keyed by identity; the entry keeps ``tab`` alive
    so the id cannot be reused)."""
    entry = _ROWS.get(id(tab))
    if entry is None or entry[0] is not tab:
        if len(_ROWS) >= 64:  # tableaux made on the fly must not accumulate here
            _ROWS.clear()
        entry = _ROWS[id(tab)] = (tab, _StageRows(tab))
    return entry[1]


class _LazyRHS:
    """``rhs(t, y)`` evaluated on first use and cached (the end derivative of a Hermite step is
    the next step's first stage, so it is computed at most once)."""

    def __init__(self, rhs, t, y):
        self.rhs, self.t, self.y, self.value = rhs, t, y, None

    def __call__(self):
        if self.value is None:
            self.value = self.rhs(self.t, self.y)
        return self.value


def dense_step(tab: ButcherTableau, t: float, h: float, y: Tensor, y_new: Tensor, ks: list[Tensor],
               f_end: Tensor | Callable[[], Tensor], rhs: RHS | None = None,
               interp: str | None = None) -> DenseStep:
    """The continuous extension of an accepted step (``f_end``: tensor, or a lazy callable;
    ``rhs(t, y) -> dy``: evaluates the tableau's dense stages, if it has any).

    ``interp``: ``None`` the tableau's own extension (cubic Hermite where it has none), ``"cubic"``
    cubic Hermite, ``"linear"`` linear interpolation of the step's ends."""
    step: DenseStep
    if interp == "linear":
        step = PolynomialDenseStep(t, h, y, y_new, [y_new - y])
    elif tab.dense is not None and interp is None:
        step = RKDenseStep(tab, t, h, y, y_new, ks, rhs)
    else:
        step = HermiteDenseStep(t, h, y, y_new, ks[0], f_end)
    step.k0 = ks[0]
    return step


STRETCH = 1.01  # an adaptive step may grow by this factor to land on the end or a stop


def _fail(msg: str, context: str, tab: ButcherTableau | SolverMethod | None) -> SolverError:
    where = context if tab is None else f"{context} with method '{tab.name}'"
    return SolverError(f"{where}: {msg}")


def integrate(rhs: RHS, y0: Tensor, t_eval: Sequence[float], config: SolverConfig, *,
              q0: Tensor | None = None, q_splits: Sequence[int] | None = None,
              atol_scale: float | Tensor = 1.0, q_atol_scale: float = 1.0,
              on_step: Callable[[DenseStep], Any] | None = None, context: str = "forward solve",
              check_finite_every_step: bool | None = None,
              first_stage: Tensor | None = None) -> IntegrateResult:
    """Integrate ``dy/dt = rhs(t, y)`` from ``t_eval[0]`` through every time in ``t_eval``.

    Args:
        rhs: ``rhs(t: float, y: Tensor[N]) -> Tensor[N]`` (or ``(Tensor[N], Tensor[Q])`` with ``q0``).
        y0: flat initial state, shape ``(N,)``.
        t_eval: strictly monotone Python floats; outputs are produced there by dense output (the
            step is never shortened to hit an interior output time, only the final one).
        config: tableau, tolerances and step options (``step_t``/``jump_t`` stops, ``perturb``,
            ``norm``, ``min_step``, ``interp``, ``callbacks``: see :class:`SolverConfig`).
        q0: optional initial quadrature ``(Q,)``; ``q`` is integrated alongside ``y`` without
            entering the stages. Unless ``config.seminorm``, it is error-controlled like the state
            (each part of ``q_splits`` on its own), so its integrand is resolved too.
        q_splits: sizes of the quadrature's parts (e.g. one per parameter tensor; default: one).
        atol_scale, q_atol_scale: the absolute tolerance of ``y`` (a float or a tensor ``(N,)``)
            and of ``q`` is ``config.atol`` times these (adjoint solves measure it in units of the
            incoming gradient's size).
        on_step: called with each accepted :class:`DenseStep` (in order); if it returns ``True``
            the solve ends after that step (``ys`` then holds only the outputs reached).
        context: names the solve in error messages (e.g. ``"backward pass (backsolve)"``).
        first_stage: ``rhs(t_eval[0], y0)`` as a solve continuing another one carried it (FSAL,
            ``carry_last``), used instead of evaluating it.

    Returns:
        :class:`IntegrateResult` with ``ys[i]`` (shape ``(N,)``) at ``t_eval[i]`` and ``q_end``, the
        quadrature at ``t_eval[-1]`` (callers needing it at several times integrate interval by
        interval).
    """
    tab = config.tableau
    if isinstance(tab, SolverMethod):
        # Multistep and scipy methods bring their own loop with this contract (adams.py, scipy_solver.py).
        return tab.integrate(rhs, y0, t_eval, config, q0=q0, q_splits=q_splits, atol_scale=atol_scale,
                             q_atol_scale=q_atol_scale, on_step=on_step, context=context,
                             check_finite_every_step=check_finite_every_step)
    quad = q0 is not None
    rows = stage_rows(tab)
    compiled = None if quad or tab.implicit else getattr(rhs, "compiled", None)
    quad_in_norm = q0 is not None and not config.seminorm and q0.numel() > 0
    t_start, t_end = float(t_eval[0]), float(t_eval[-1])
    # Smallest step still resolvable: relative to the times involved, so a problem scaled into a
    # tiny interval (say [0, 1e-14]) solves like the same problem on [0, 1].
    h_floor_scale = max(abs(t_start), abs(t_end), abs(t_end - t_start))
    direction = 1.0 if t_end >= t_start else -1.0
    if check_finite_every_step is None:
        check_finite_every_step = y0.device.type == "cpu"
    blocks = [y0]  # the outputs: (N,) states and (K, N) blocks of dense output, in time order
    result = IntegrateResult(q_end=q0, step_times=[t_start], blocks=blocks)
    n_eval = len(t_eval)
    if n_eval == 1 or t_start == t_end:
        return result

    atol = config.atol * atol_scale
    q_atol = config.atol * q_atol_scale
    if check_finite_every_step:
        every = FINITE_CHECK_EVERY if y0.numel() <= FINITE_CHECK_HOLD else 1
        y_watch = _FiniteWatch(every, lambda t0, t1: _fail(
            f"the state became NaN/Inf between t={t0:.6g} and t={t1:.6g}; use a smaller step_size or "
            "an adaptive method, or check func.", context, tab))
        q_watch = _FiniteWatch(every, lambda t0, t1: _fail(
            f"the integrated parameter gradient became NaN/Inf between t={t0:.6g} and t={t1:.6g}; "
            "check func (its vector-Jacobian product) or lower the scale of the loss.", context, tab))
    # q and dq are None exactly when quad is False; the checker cannot follow that invariant
    # through the loop's `if quad:` branches, so the running quadrature is left untyped.
    q: Any
    dq: Any
    t, y, q = t_start, y0, q0
    rhs_y = (lambda tt, yy: rhs(tt, yy)[0]) if quad else rhs
    f = first_stage
    next_out = 1
    adaptive = config.adaptive
    carry = tab.carry_last and (adaptive or config.carry_last)
    callbacks = config.callbacks or StepCallbacks()
    # Step boundaries where func is evaluated just inside the step instead of on the boundary.
    jumps = jumps_within(config.jump_t, t_start, t_end)
    moves = config.perturb or bool(jumps)  # some step evaluates func off its boundaries
    time_dtype = config.time_dtype
    min_step = config.min_step
    if adaptive:
        assert tab.error_order is not None  # ButcherTableau requires it with b_err
        controller = PIController(tab.error_order, safety=config.safety, ifactor=config.ifactor,
                                  dfactor=config.dfactor, beta=config.beta, max_step=config.max_step)
        # Adaptive steps are shortened to land on these (an interior output time never shortens one).
        stops = stops_between(tuple(config.step_t) + tuple(config.jump_t), t_start, t_end)
        next_stop = 0
        if f is None:
            f = boundary_rhs(rhs, t, t_end, time_dtype, config.perturb or t in jumps, False)(t, y)
        if config.first_step is not None:
            h = direction * abs(config.first_step)
        else:
            k0 = f[0] if quad else f
            h = initial_step((lambda tt, yy: rhs(tt, yy)[0]) if quad else rhs, t, y, k0,
                             tab.order, config.rtol, atol, direction, abs(t_end - t_start),
                             norm=_state_norm(config.norm, q if quad_in_norm else None))
        h = math.copysign(min(max(abs(h), min_step), config.max_step), direction)
    else:
        grid = make_grid(t_start, t_end, config.step_size, config.grid, t_eval,
                         constructor=config.grid_constructor, rhs=rhs, y0=y0,
                         stops=tuple(config.step_t) + tuple(config.jump_t),
                         max_num_steps=config.max_num_steps, context=context, method=tab)
        gi = 1

    attempts = 0
    while next_out < n_eval:
        attempts += 1
        if attempts > config.max_num_steps:
            raise _fail(f"reached max_num_steps={config.max_num_steps} at t={t:.6g} before "
                        f"t={t_end:.6g} ({result.steps} accepted, {result.rejected} rejected steps). "
                        "The problem may be stiff or the tolerances too tight; raise "
                        "options={'max_num_steps': ...} or loosen rtol/atol.", context, tab)
        if adaptive:
            h_try = h
            if abs(h) < min_step:
                h = math.copysign(min_step, direction)
            while next_stop < len(stops) and direction * (stops[next_stop] - t) <= 0:
                next_stop += 1
            # A step that falls short of the end (or of a stop) by less than 1% of itself is
            # stretched to reach it (Hairer's DOPRI5 does the same), instead of leaving a sliver
            # that costs a whole step; never beyond max_step.
            reach = t + (h if abs(h) * STRETCH > config.max_step else h * STRETCH)
            if next_stop < len(stops) and direction * (reach - stops[next_stop]) >= 0:
                t_next, last_step = stops[next_stop], False
            else:
                last_step = direction * (reach - t_end) >= 0
                t_next = t_end if last_step else t + h
            # The step actually taken is the difference of two representable times, so replaying
            # the recorded grid (checkpointed, interpolating) reproduces this step bit for bit.
            h = t_next - t
            if h == 0.0:
                raise _fail(f"step size underflow at t={t:.6g}: the step is below the resolution of "
                            "t (t + h == t). options['first_step'] may be too small, or the "
                            "right-hand side changes too fast near this t; check func or loosen "
                            "rtol/atol.", context, tab)
        else:
            t_next = grid[gi]
            h = t_next - t
            last_step = gi == len(grid) - 1
        if callbacks.step is not None:
            callbacks.step(t, y, h)
        if moves:
            end_moved = config.perturb or t_next in jumps
            srhs = boundary_rhs(rhs, t, t_next, time_dtype, config.perturb or t in jumps, end_moved)
        else:
            end_moved, srhs = False, rhs
        # The compiled step (options={"compile": ...}) evaluates the first stage itself; not where
        # boundary_rhs moves evaluations off the step's ends (those steps run eagerly).
        step_compiled = compiled is not None and srhs is rhs
        # A replay (lean_fsal) hands the compiled step its first stage like every other step: one
        # compiled variant fewer (torch.compile's recompile limit counts them).
        if f is None and (not step_compiled or config.lean_fsal):
            f = srhs(t, y)
        eval_last = not (config.lean_fsal and on_step is None and (last_step or end_moved)
                         and direction * (t_eval[next_out] - t_next) >= 0)  # no output inside
        y_new, ks, dqs, f_new = rk_step(srhs, tab, t, y, f, h, quad=quad, eval_last=eval_last,
                                        config=config, context=context, atol=atol, rows=rows)
        if f is None:  # the compiled step evaluated the first stage
            f = ks[0]
        dq = combine_stages(None, dqs, rows.b, h) if quad else None

        if adaptive:
            ratio = _step_error_ratio(config, rows.b_err, h, y, y_new, ks, atol,
                                      (dqs, q, dq, q_atol, q_splits) if quad_in_norm else None)
            if not math.isfinite(ratio):
                k0 = f[0] if quad else f
                if not bool(torch.isfinite(k0).all()):
                    raise _fail(f"the right-hand side returned NaN/Inf at t={t:.6g} for a finite "
                                "state; check func (e.g. log/sqrt/division of the state) or its "
                                "parameters.", context, tab)
                ratio = math.inf
            # A step no longer than min_step is accepted whatever its error (torchdiffeq's min_step).
            accepted = ratio <= 1.0 or (abs(h) <= min_step and math.isfinite(ratio))
            if math.isfinite(ratio):
                h_next = controller.propose(h, ratio, accepted)
            else:
                h_next = h * config.dfactor
                controller.after_rejection = True
            if not accepted:
                if callbacks.reject is not None:
                    callbacks.reject(t, y, h)
                result.rejected += 1
                # With min_step, only a non-finite error can reject a step of that size again.
                stuck = min_step > 0 and abs(h) <= min_step
                h = h_next
                if stuck or abs(h) <= 16 * math.ulp(max(abs(t), h_floor_scale)):
                    why = ("the state or the right-hand side became NaN/Inf" if ratio == math.inf
                           else "the error estimate stays above tolerance")
                    raise _fail(f"step size underflow at t={t:.6g} (h={h:.3g}): {why}. The solution "
                                "may blow up in finite time, or the problem is too stiff for an "
                                "explicit method; loosen rtol/atol or check func.", context, tab)
                continue
            if callbacks.accept is not None:
                callbacks.accept(t, y, h)
        else:
            gi += 1
            if check_finite_every_step:
                y_watch.add(t, t_next, y_new)
                if last_step or y_watch.due():
                    y_watch.check(y_new)
            elif last_step and not all_finite(y_new):
                raise _fail(f"the state became NaN/Inf between t={t:.6g} and t={t_next:.6g}; use a "
                            "smaller step_size or an adaptive method, or check func.", context, tab)

        t1 = t_next
        result.steps += 1
        result.step_times.append(t1)
        out_here = direction * (t_eval[next_out] - t1) <= 0  # an output time falls in this step
        lazy_f = None
        if tab.fsal:
            f_end = f_new
        elif carry:
            # The derivative the next step starts from (see ButcherTableau.carry_last) also ends
            # this step's Hermite interpolant: off by the order of the local error, at no cost.
            f_end = ks[-1] if dqs is None else (ks[-1], dqs[-1])
        elif out_here or on_step is not None:  # the step's dense output may be needed
            lazy_f = _LazyRHS(srhs, t1, y_new)
            f_end = lazy_f
        step = None
        if out_here:
            next_out, step = collect_outputs(
                blocks, t_eval, next_out, t, t1, direction, y_new,
                lambda: dense_step(tab, t, t1 - t, y, y_new, ks, _resolve(f_end, quad), rhs_y,
                                   config.interp),
                check_finite=check_finite_every_step, context=context, method=tab)
        stop = False
        if on_step is not None:
            if step is None:
                step = dense_step(tab, t, t1 - t, y, y_new, ks, _resolve(f_end, quad), rhs_y, config.interp)
            stop = on_step(step) is True
        if quad:
            # Out of place for the first step so the caller's q0 is never mutated.
            q = q.add_(dq) if (q is not q0 and not torch.is_grad_enabled()) else q + dq
            if check_finite_every_step:
                q_watch.add(t, t1, dq)
                if last_step or q_watch.due():
                    q_watch.check(q)
        t, y = t1, y_new
        if end_moved:
            # func was evaluated just before t1; the next step needs it just after.
            f = None
        elif tab.fsal:
            f = f_new
        elif carry:
            f = f_end
        else:
            f = None if lazy_f is None else lazy_f.value
        if adaptive:
            h = h_next
        if stop:  # on_step asked to end the solve here (an event was found)
            break
    if check_finite_every_step:  # steps since the last check (a solve ended early by on_step)
        if y_watch.pending:
            y_watch.check(y)
        if quad and q_watch.pending:
            q_watch.check(q)
    result.q_end = q
    result.carried = f
    if adaptive:
        result.next_step = max(abs(h), abs(h_try))
    if not check_finite_every_step:
        # One host sync for the whole solve (the per-step checks are skipped off the CPU).
        tail = blocks[1:] + ([q] if quad else [])
        if not bool(torch.stack([torch.isfinite(v).all() for v in tail]).all()):
            raise _fail(f"the solution became NaN/Inf between t={t_start:.6g} and t={t_end:.6g}; "
                        "use a smaller step_size or an adaptive method, or check func.", context, tab)
    return result


def collect_outputs(blocks: list[Tensor], t_eval: Sequence[float], next_out: int, t0: float, t1: float,
                    direction: float, y_new: Tensor, make_step: Callable[[], DenseStep], *,
                    check_finite: bool, context: str,
                    method: ButcherTableau | SolverMethod) -> tuple[int, DenseStep | None]:
    """Append to ``blocks`` the states at the output times ``t_eval[next_out:]`` that an accepted
    step from ``t0`` to ``t1`` reaches; shared by every stepping loop.

    Every output time inside the step comes from one evaluation of its continuous extension
    (``make_step()``, built only if needed): a ``(K, N)`` block, whose rows are views, and stacking
    them back costs one autograd node per block, so many output times cost about what one does.
    An output at ``t1`` itself is ``y_new``. Returns ``(next_out, step or None)``.
    """
    n_eval, j = len(t_eval), next_out
    while j < n_eval and direction * (t_eval[j] - t1) <= 0:
        j += 1
    step = None
    if j > next_out:
        inner = t_eval[next_out:j - 1] if t_eval[j - 1] == t1 else t_eval[next_out:j]
        if inner:
            step = make_step()
            block = step.evaluate(inner[0]).unsqueeze(0) if len(inner) == 1 else step.evaluate_many(inner)
            # The continuous extension can overflow inside a step whose end state is finite.
            if check_finite and not all_finite(block):
                bad = int((~torch.isfinite(block)).any(1).nonzero()[0, 0])
                raise _fail(f"the dense output at t={inner[bad]:.6g} became NaN/Inf inside the step "
                            f"from t={t0:.6g} to t={t1:.6g}; use a smaller step_size or an adaptive "
                            "method, or check func.", context, method)
            blocks.append(block)
        if len(inner) < j - next_out:
            blocks.append(y_new)
    return j, step


def _state_norm(norm, q=None):
    """A custom ``norm(e_y, e_q)`` as a norm of the state's scaled error alone (or None), for the
    initial step heuristic (the quadrature, if error-controlled, enters as zero)."""
    if norm is None:
        return None
    e_q = None if q is None else torch.zeros_like(q)
    return lambda e: norm(e, e_q)


def _step_error_ratio(config: SolverConfig, b_err: StageRow | None, h: float, y: Tensor, y_new: Tensor,
                      ks: list, atol: float | Tensor, quad: tuple | None) -> float:
    """The error ratio of a step from ``y`` to ``y_new`` (stages ``ks``): at most 1 accepts it.

    ``quad``: ``(dqs, q, dq, q_atol, q_splits)`` when the quadrature is error-controlled (its
    stages, value before the step, increment, absolute tolerance, parts), else None. The one host
    sync per step (``.item()``) happens here."""
    assert b_err is not None  # only adaptive tableaux, which have error weights, get here
    with torch.no_grad():
        err = combine_stages(None, ks, b_err, h)
        if quad is not None:
            dqs, q, dq, q_atol, q_splits = quad
            err_q = combine_stages(None, dqs, b_err, h)
        else:
            err_q = q = dq = q_atol = q_splits = None
        if config.norm is not None:
            return _custom_ratio(config, err, y.detach(), y_new.detach(), atol, err_q, q, dq, q_atol,
                                 quad is not None)
        ratio = None if err is None else error_ratio(err, y, y_new, config.rtol, atol, config.norm_splits)
        if err_q is not None:
            q_det = q.detach()
            r_q = quadrature_error_ratio(err_q, q_det, q_det + dq.detach(), config.rtol, q_atol, q_splits)
            ratio = r_q if ratio is None else torch.maximum(ratio, r_q)
        return 0.0 if ratio is None else ratio.item()


def _custom_ratio(config, err, y, y_new, atol, err_q, q, dq, q_atol, quad_in_norm) -> float:
    """The error ratio by ``config.norm`` of the scaled error estimates of ``y`` and ``q``."""
    scale = torch.maximum(y.abs(), y_new.abs()).mul_(config.rtol).add_(atol)
    e_y = torch.zeros_like(y) if err is None else err / scale
    e_q = None
    if quad_in_norm:
        q_det = q.detach()
        q_scale = torch.maximum(q_det.abs(), (q_det + dq.detach()).abs()).mul_(config.rtol).add_(q_atol)
        e_q = torch.zeros_like(q_det) if err_q is None else err_q / q_scale
    r = config.norm(e_y, e_q)
    return float(r.abs() if isinstance(r, torch.Tensor) else abs(r))


# NaN/Inf checks on the CPU: every FINITE_CHECK_EVERY steps, of the newest state and running
# quadrature only. Both stay non-finite once they are (y_new = y + h * sum b_i k_i, q = q + dq), so
# a finite newest value clears every step since the last check; a non-finite one is traced back to
# its first step through the held references. Holding them costs up to that many states, so states
# above FINITE_CHECK_HOLD entries (whose fields dwarf a check) are checked every step.
FINITE_CHECK_EVERY = 8
FINITE_CHECK_HOLD = 1 << 16


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf: one reduction and one host sync (the sum of the entries is
    non-finite whenever one of them is; only when it overflows is every entry tested)."""
    if x.requires_grad:
        x = x.detach()
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


class _FiniteWatch:
    """Deferred NaN/Inf checks of a quantity that stays non-finite once it is (see above).

    ``add(t0, t1, x)`` records a step and ``x``, the tensor it contributed (the new state, or the
    quadrature increment); ``check(latest)`` tests only the newest accumulated value and, if it is
    not finite, raises ``fail(t0, t1)`` for the first recorded step whose ``x`` is not."""

    def __init__(self, every: int, fail):
        self.every, self.fail = every, fail
        self.pending: list[tuple[float, float, Tensor]] = []

    def add(self, t0: float, t1: float, x: torch.Tensor) -> None:
        self.pending.append((t0, t1, x))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def check(self, latest: torch.Tensor) -> None:
        if not all_finite(latest):
            for t0, t1, x in self.pending:
                if not all_finite(x):
                    raise self.fail(t0, t1)
            # Not finite before the held steps (a non-finite start): name the whole span.
            raise self.fail(self.pending[0][0], self.pending[-1][1])
        self.pending.clear()


class _FirstOf:
    """Lazy access to ``dy`` of a lazily evaluated ``(dy, dq)`` pair."""

    def __init__(self, lazy):
        self.lazy = lazy

    def __call__(self):
        return self.lazy()[0]


def _resolve(f_end, quad):
    """The Hermite end derivative: a tensor, or a lazy callable returning the ``dy`` part."""
    if isinstance(f_end, _LazyRHS):
        return _FirstOf(f_end) if quad else f_end
    return f_end[0] if quad else f_end
