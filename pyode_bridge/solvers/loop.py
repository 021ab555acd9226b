"""The stepping loop shared by the forward solve and every backward (adjoint) solve.

Times are Python floats: step acceptance needs exactly one host sync per step (the error ratio);
nothing else leaves the device. Accepted step sizes are plain floats, so they are constants of the
discrete map and are never differentiated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .boundaries import StepCallbacks, boundary_rhs, jumps_within, stops_between
from .combine import StageRow, combine_stages
from .config import SolverConfig
from .controller import AdaptiveControl, GridControl, PIController, error_ratio, initial_step, quadrature_error_ratio
from .dense import DenseStep, HermiteDenseStep, PolynomialDenseStep, RKDenseStep
from .implicit import implicit_rk_step
from .method import SolverMethod, Stepper
from .tableau import ButcherTableau
from .util import Outputs, add_quadrature, all_finite, collect_outputs, fail

# all_finite and collect_outputs live in .util (scipy shares them); importable here too.

__all__ = ["SolverConfig", "IntegrateResult", "integrate", "rk_step", "dense_step", "make_grid", "RHS",
           "StepOutput", "StepResult", "RKStepper", "step_error_ratio", "stage_rows", "all_finite",
           "collect_outputs", "drive", "Replay", "fixed_grid", "LazyRHS", "FirstOf"]

# The right-hand side of a flat solve: ``rhs(t, y (N,)) -> dy (N,)``, or ``(dy (N,), dq (Q,))`` when
# a quadrature rides along (integrate's ``q0``). Which of the two is fixed per solve, not per call,
# so the return is left open here rather than a Union every caller would have to narrow.
RHS = Callable[[float, Tensor], Any]
# rk_step's result: ``(y_new (N,), ks [(N,)] * S, dqs [(Q,)] * S or None, f_new)``; ``f_new`` is
# the FSAL derivative at the new state (shaped like an ``rhs`` return) or None.
StepOutput = tuple[Tensor, list, Optional[list], Any]


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
            raise fail(f"{what} from t={t_start:.6g} to t={t_end:.6g} has {n} steps, more than "
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
    tolerances and Newton options (``atol``, a float or a tensor ``(N,)``, replaces
    ``config.control.atol``; ``context`` names the solve in its errors). ``rows``:
    ``stage_rows(tab)``, if the caller has it.
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


class LazyRHS:
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



class FirstOf:
    """Lazy access to ``dy`` of a lazily evaluated ``(dy, dq)`` pair."""

    def __init__(self, lazy: LazyRHS) -> None:
        self.lazy = lazy

    def __call__(self) -> Tensor:
        return self.lazy()[0]


@dataclass(eq=False)
class StepResult:
    """One attempted step from ``(t0, y0)`` to ``t1`` (what :meth:`RKStepper.attempt` returns).

    ``y_new`` ``(N,)``; ``ks``: the stages ``[(N,)] * S``; ``dqs``/``dq``: the quadrature's stages
    ``[(Q,)] * S`` and increment ``(Q,)`` (None without one); ``q0``: the quadrature before the
    step, ``q1`` after it (set when the step is accepted); ``f_new``: an FSAL tableau's derivative
    at the new state; ``k0``: the first stage's state part ``(N,)``; ``srhs``: the right-hand side
    the step evaluated (``rhs`` itself, or moved off the step's ends, ``end_moved``: at ``t1``).
    """

    stepper: RKStepper
    t0: float
    t1: float
    y0: Tensor
    y_new: Tensor
    ks: list
    dqs: list | None
    dq: Tensor | None
    q0: Tensor | None
    f_new: Any
    srhs: RHS
    end_moved: bool
    k0: Tensor
    q1: Tensor | None = None
    _dense: DenseStep | None = None
    _lazy: LazyRHS | None = None

    def dense(self) -> DenseStep:
        """The step's continuous extension, built on first use (a Hermite end derivative that is
        not at hand is evaluated only if the extension needs it; the next step then reuses it)."""
        if self._dense is None:
            s = self.stepper
            f_end: Any
            if s.tab.fsal:
                f_end = self.f_new[0] if s.quad else self.f_new
            elif s.carry:
                # The derivative the next step starts from (see ButcherTableau.carry_last) also
                # ends this step's Hermite interpolant: off by the order of the local error, free.
                f_end = self.ks[-1]
            else:
                lazy = self._lazy = LazyRHS(self.srhs, self.t1, self.y_new)
                f_end = FirstOf(lazy) if s.quad else lazy
            self._dense = dense_step(s.tab, self.t0, self.t1 - self.t0, self.y0, self.y_new, self.ks, f_end,
                                     s.rhs_y, s.interp)
        return self._dense

    def carried(self) -> Any:
        """The derivative at ``(t1, y_new)`` the next step starts from (shaped like an ``rhs``
        return), or None where it must be evaluated afresh."""
        s = self.stepper
        if self.end_moved:  # func was evaluated just before t1; the next step needs it just after
            return None
        if s.tab.fsal:
            return self.f_new
        if s.carry:
            return self.ks[-1] if self.dqs is None else (self.ks[-1], self.dqs[-1])
        return None if self._lazy is None else self._lazy.value


class RKStepper:
    """The Runge-Kutta stepper of :func:`integrate` (the contract of
    :class:`~pyode_bridge.solvers.method.Stepper`): it holds the solve's state and attempts steps.

    Each step evaluates ``func`` just inside its ends where ``perturb`` or a ``jump_t`` asks for it
    (:func:`~pyode_bridge.solvers.boundaries.boundary_rhs`); the first stage is the one carried
    from the step before where the tableau allows it (FSAL, ``carry_last``, a Hermite end
    derivative already evaluated), or ``first_stage`` at the start; the compiled step
    (``rhs.compiled``) evaluates it itself where no evaluation is moved.
    """

    def __init__(self, rhs: RHS, tab: ButcherTableau, config: SolverConfig, y0: Tensor, q0: Tensor | None,
                 first_stage: Any, atol: float | Tensor, t_start: float, t_end: float, context: str) -> None:
        self.rhs, self.tab, self.config, self.atol, self.context = rhs, tab, config, atol, context
        self.quad = quad = q0 is not None
        self.rows = stage_rows(tab)
        self.compiled = None if quad or tab.implicit else getattr(rhs, "compiled", None)
        self.y, self.q, self.q0, self.f = y0, q0, q0, first_stage
        self.prev: StepResult | None = None  # the accepted step whose end derivative comes next
        self.rhs_y: RHS = (lambda tt, yy: rhs(tt, yy)[0]) if quad else rhs
        self.carry = tab.carry_last and (config.adaptive or config.carry_last)
        # An exact replay (lean_fsal) leaves out an FSAL last stage nothing reads: set to the
        # Replay whose next output time tells whether one lies inside the step.
        self.lean: Replay | None = None
        self.t_start, self.t_end, self.interp = t_start, t_end, config.interp
        # Step boundaries where func is evaluated just inside the step instead of on the boundary.
        self.jumps = jumps_within(config.time.jump_t, t_start, t_end)
        self.perturb, self.time_dtype = config.time.perturb, config.time.dtype
        self.moves = config.time.perturb or bool(self.jumps)  # some step evaluates func off its boundaries
        self.on_attempt = config.callbacks.step if config.callbacks is not None else None

    def first_stage(self) -> Any:
        """``rhs(t_start, y0)`` (as given, or evaluated now, just inside the interval if asked)."""
        if self.f is None:
            t = self.t_start
            self.f = boundary_rhs(self.rhs, t, self.t_end, self.time_dtype,
                                  self.perturb or t in self.jumps, False)(t, self.y)
        return self.f

    def attempt(self, t0: float, t1: float) -> StepResult:
        """One step from the current state at ``t0`` to ``t1``."""
        y, h, rhs = self.y, t1 - t0, self.rhs
        if self.on_attempt is not None:
            self.on_attempt(t0, y, h)
        end_moved, srhs = False, rhs
        if self.moves:
            end_moved = self.perturb or t1 in self.jumps
            srhs = boundary_rhs(rhs, t0, t1, self.time_dtype, self.perturb or t0 in self.jumps, end_moved)
        if self.prev is not None:
            self.f, self.prev = self.prev.carried(), None
        f = self.f
        # A replay (lean_fsal) hands the compiled step its first stage like every other step: one
        # compiled variant fewer (torch.compile's recompile limit counts them).
        if f is None and (self.compiled is None or srhs is not rhs or self.lean is not None):
            f = self.f = srhs(t0, y)
        quad, eval_last, o = self.quad, True, self.lean
        if o is not None and (t1 == self.t_end or end_moved):  # no next step starts from f_new
            eval_last = o.direction * (o.t_eval[o.next_out] - t1) < 0  # an output inside the step
        y_new, ks, dqs, f_new = rk_step(srhs, self.tab, t0, y, f, h, quad=quad, eval_last=eval_last,
                                        config=self.config, context=self.context, atol=self.atol,
                                        rows=self.rows)
        if f is None:  # the compiled step evaluated the first stage
            f = self.f = ks[0]
        dq = combine_stages(None, dqs, self.rows.b, h) if quad else None
        return StepResult(self, t0, t1, y, y_new, ks, dqs, dq, self.q, f_new, srhs, end_moved,
                          f[0] if quad else f)

    def accept(self, step: StepResult) -> None:
        """Advance the state to the end of the accepted ``step`` (sets its ``q1``)."""
        self.y, self.prev = step.y_new, step
        if step.dq is not None:
            self.q = step.q1 = add_quadrature(self.q, self.q0, step.dq)

    def restart(self, y0: Tensor, first_stage: Any, t_start: float, t_end: float) -> None:
        """Start afresh from ``y0`` at ``t_start`` towards ``t_end`` (``first_stage``: the
        derivative to start from, or None), inside the interval the stepper was made for: its
        ``jump_t`` times are that interval's, which tell the same for every boundary inside it.
        A :class:`Replay`'s next segment; no quadrature."""
        self.y, self.f, self.prev = y0, first_stage, None
        self.t_start, self.t_end = t_start, t_end

    def finish(self) -> Any:
        """After the last step: the derivative a next step would start from (see
        :attr:`IntegrateResult.carried`). The stepper then holds no state or stage (a
        :class:`Replay`'s stepper outlives its segment: they must not keep the segment's graph
        alive into the next one; the caller frees it as soon as it is differentiated)."""
        carried = self.f if self.prev is None else self.prev.carried()
        # The last step and the stepper refer to each other: a cycle that would keep the step's
        # stages (and their graph) alive until the garbage collector runs (every ~25 replays).
        self.y, self.f, self.prev = None, None, None  # type: ignore[assignment]
        return carried


def integrate(rhs: RHS, y0: Tensor, t_eval: Sequence[float], config: SolverConfig, *,
              q0: Tensor | None = None, q_splits: Sequence[int] | None = None,
              atol_scale: float | Tensor = 1.0, q_atol_scale: float = 1.0,
              on_step: Callable[[DenseStep], Any] | None = None, context: str = "forward solve",
              check_finite_every_step: bool | None = None,
              first_stage: Tensor | tuple[Tensor, Tensor] | None = None,
              grid: Sequence[float] | None = None) -> IntegrateResult:
    """Integrate ``dy/dt = rhs(t, y)`` from ``t_eval[0]`` through every time in ``t_eval``.

    Args:
        rhs: ``rhs(t: float, y: Tensor[N]) -> Tensor[N]`` (or ``(Tensor[N], Tensor[Q])`` with ``q0``).
        y0: flat initial state, shape ``(N,)``.
        t_eval: strictly monotone Python floats; outputs are produced there by dense output (the
            step is never shortened to hit an interior output time, only the final one).
        config: the method and its options in parts (step control, grid and stops, Newton,
            acceleration; ``interp``, ``callbacks``: see :class:`SolverConfig`).
        q0: optional initial quadrature ``(Q,)``; ``q`` is integrated alongside ``y`` without
            entering the stages. Unless ``config.control.seminorm``, it is error-controlled like
            the state (each part of ``q_splits`` on its own), so its integrand is resolved too.
        q_splits: sizes of the quadrature's parts (e.g. one per parameter tensor; default: one).
        atol_scale, q_atol_scale: the absolute tolerance of ``y`` (a float or a tensor ``(N,)``)
            and of ``q`` is ``config.control.atol`` times these (adjoint solves measure it in units
            of the incoming gradient's size).
        on_step: called with each accepted :class:`DenseStep` (in order); if it returns ``True``
            the solve ends after that step (``ys`` then holds only the outputs reached).
        context: names the solve in error messages (e.g. ``"backward pass (backsolve)"``).
        check_finite_every_step: NaN/Inf checks during the solve (default: on the CPU), else one
            at its end.
        first_stage: ``rhs(t_eval[0], y0)`` (shaped like an ``rhs`` return), to start from instead
            of evaluating it, as a step starts from the derivative carried from the step before
            (a replayed segment of a checkpointed solve). Runge-Kutta tableaux only: a
            :class:`SolverMethod` evaluates its own.
        grid: step boundaries from ``t_eval[0]`` to ``t_eval[-1]`` that a recorded solve took, to
            step on exactly, in place of ``config``'s steps (a non-adaptive ``config``): a replayed
            segment, whose grid is taken as recorded (not re-validated, no stops added), from one
            replay configuration made for all segments. Not for a method with its own loop (scipy).
            An exact replay configuration (``config.replay(grid, exact=True)``, a tableau's)
            without ``on_step`` is stepped by :class:`Replay` (no quadrature there).

    Returns:
        :class:`IntegrateResult` with ``ys[i]`` (shape ``(N,)``) at ``t_eval[i]`` and ``q_end``, the
        quadrature at ``t_eval[-1]`` (callers needing it at several times integrate interval by
        interval).
    """
    tab = config.method
    if not isinstance(tab, ButcherTableau) and tab.own_loop:  # a plain class: no ABC check per replay
        # scipy picks, retries and interpolates its steps itself (scipy_solver.py).
        return tab.integrate(rhs, y0, t_eval, config, q0=q0, q_splits=q_splits, atol_scale=atol_scale,
                             q_atol_scale=q_atol_scale, on_step=on_step, context=context,
                             check_finite_every_step=check_finite_every_step)
    t_start, t_end = float(t_eval[0]), float(t_eval[-1])
    if len(t_eval) == 1 or t_start == t_end:
        return IntegrateResult(q_end=q0, step_times=[t_start], blocks=[y0])
    if config.lean_fsal and on_step is None:  # an exact replay (checkpointed): no loop needed
        if grid is None:
            grid = fixed_grid(config, t_eval, rhs, y0, context)
        return Replay(rhs, config, t_start, t_end, context, atol_scale).segment(
            rhs, y0, t_eval, grid, first_stage, q0)
    if check_finite_every_step is None:
        check_finite_every_step = y0.device.type == "cpu"
    atol = config.control.atol * atol_scale
    init: Callable[..., Stepper] = RKStepper if isinstance(tab, ButcherTableau) else tab.stepper
    stepper = init(rhs, tab, config, y0, q0, first_stage, atol, t_start, t_end, context)
    quad_tol = ((config.control.atol * q_atol_scale, q_splits)
                if q0 is not None and not config.control.seminorm and q0.numel() > 0 else None)
    control = (_step_control(config, stepper, t_eval, quad_tol, context) if grid is None
               else GridControl(grid, config.control.max_num_steps, context, tab))
    measure = _error_measure(config, stepper, atol, quad_tol)
    outputs = Outputs(y0, t_eval, on_step, adaptive=config.adaptive, quad=q0 is not None,
                      check_every_step=check_finite_every_step, context=context, method=tab)
    drive(control, stepper, measure, outputs)
    result = IntegrateResult(q_end=stepper.q, step_times=control.step_times, steps=control.steps,
                             rejected=control.rejected, blocks=outputs.blocks)
    result.next_step = control.next_step
    result.carried = stepper.finish()
    return result


class Replay:
    """Exact replays of a recorded Runge-Kutta solve on its recorded step boundaries, segment by
    segment: ``checkpointed``'s backward (one per backward pass), and :func:`integrate` on an
    exact replay configuration (``config.replay(grid, exact=True)``) without ``on_step``.

    An exact replay repeats the recorded solve's arithmetic (same boundaries, same carried stages,
    ``jump_t``/``perturb`` evaluations moved as they were), so it needs nothing of the loop's step
    control (every step stands; none is landed or measured) and no NaN/Inf checks (they ran on
    these very numbers): :meth:`segment` steps the stepper straight through the grid and collects
    the outputs as :class:`~pyode_bridge.solvers.util.Outputs` does. The stepper is made for the
    whole interval ``t_start`` .. ``t_end`` and restarted per segment: a one-step segment spent a
    fifth of its replay building the loop's objects. ``direction``, ``t_eval`` and ``next_out``
    are what the stepper's ``lean`` reads (is an output time left inside the last step?).
    """

    def __init__(self, rhs: RHS, config: SolverConfig, t_start: float, t_end: float,
                 context: str, atol_scale: float | Tensor = 1.0) -> None:
        if not (isinstance(config.method, ButcherTableau) and config.lean_fsal):
            raise ValueError("an exact replay repeats a Runge-Kutta tableau's solve: it takes "
                             "config.replay(grid, exact=True) of a ButcherTableau method")
        self.rhs, self.config, self.context = rhs, config, context
        self.t_start, self.t_end = t_start, t_end
        self.direction = 1.0 if t_end >= t_start else -1.0
        self.atol = config.control.atol * atol_scale
        self.stepper: RKStepper | None = None
        self.t_eval: Sequence[float] = ()
        self.next_out = 1

    def segment(self, rhs: RHS, y0: Tensor, t_eval: Sequence[float], grid: Sequence[float],
                first_stage: Any = None, q0: Tensor | None = None) -> IntegrateResult:
        """Replay the recorded steps ``grid`` (boundaries, inside ``t_start`` .. ``t_end``) from
        ``y0`` ``(N,)`` with ``rhs`` (``self.rhs``, or a wrapper of it for this segment), starting
        from ``first_stage`` (the recorded first stage, or None to evaluate it); outputs at
        ``t_eval`` (from ``grid[0]`` to ``grid[-1]``). Returns the :class:`IntegrateResult`
        (``blocks``, ``carried``, ``step_times``; no quadrature: ``q0`` must be None)."""
        if q0 is not None:
            raise ValueError("an exact replay carries no quadrature (q0); replay without exact=True")
        if t_eval[0] != grid[0] or t_eval[-1] != grid[-1]:
            raise ValueError(f"a replayed segment's output times must run from its first step boundary "
                             f"to its last: t_eval {t_eval[0]} .. {t_eval[-1]}, grid {grid[0]} .. {grid[-1]}")
        tab = self.config.method
        assert isinstance(tab, ButcherTableau)  # checked in __init__
        s = self.stepper
        if s is None or s.rhs is not rhs:  # rhs decides the stepper's compiled step and rhs_y
            s = self.stepper = RKStepper(rhs, tab, self.config, y0, None, first_stage, self.atol, self.t_start,
                                         self.t_end, self.context)
            s.lean = self
        s.restart(y0, first_stage, grid[0], grid[-1])
        blocks, direction, context = [y0], self.direction, self.context
        self.t_eval, self.next_out = t_eval, 1
        t0 = grid[0]
        for i in range(1, len(grid)):
            t1 = grid[i]
            step = s.attempt(t0, t1)
            s.accept(step)
            if direction * (t_eval[self.next_out] - t1) <= 0:  # an output time in this step
                self.next_out, _ = collect_outputs(blocks, t_eval, self.next_out, t0, t1, direction, step.y_new,
                                                   step.dense, check_finite=False, context=context, method=tab)
            t0 = t1
        result = IntegrateResult(step_times=list(grid), steps=len(grid) - 1, blocks=blocks)
        result.carried = s.finish()
        return result


def drive(control: Any, stepper: Any, measure: Callable[[Any], Any], outputs: Any) -> None:
    """The stepping loop itself, over a step control, a stepper, an error measure and an outputs
    object: :func:`integrate`'s, or per-sample solving's (:mod:`~pyode_bridge.solvers.per_sample`,
    whose parts work on ``(B,)`` times)."""
    while not control.done:
        t0, t1 = control.propose()
        step = stepper.attempt(t0, t1)
        if not control.judge(measure(step), step):
            continue  # rejected: the state stays, the controller proposes a shorter step
        stepper.accept(step)
        if outputs.emit(step, control.done):
            break  # on_step asked to end the solve here (an event was found)
    outputs.finish(stepper.y, stepper.q)


def _step_control(config: SolverConfig, stepper: Stepper, t_eval: Sequence[float],
                  quad_tol: tuple | None, context: str) -> AdaptiveControl | GridControl:
    """The solve's step control: the fixed grid, or the PI-controlled adaptive steps with their
    first step (``options['first_step']``, else the initial step heuristic, on the first stage)."""
    tab, t_start, t_end = config.method, float(t_eval[0]), float(t_eval[-1])
    c, g = config.control, config.time
    stops = tuple(g.step_t) + tuple(g.jump_t)
    if not config.adaptive:
        return GridControl(fixed_grid(config, t_eval, stepper.rhs, stepper.y, context), c.max_num_steps, context, tab)
    assert isinstance(stepper, RKStepper)  # adaptive: tableaux only
    tab = stepper.tab
    assert tab.error_order is not None  # ButcherTableau requires it with b_err
    pi = PIController(tab.error_order, safety=c.safety, ifactor=c.ifactor, dfactor=c.dfactor, beta=c.beta,
                      max_step=c.max_step)
    direction = 1.0 if t_end >= t_start else -1.0
    f = stepper.first_stage()
    if c.first_step is not None:
        h = direction * abs(c.first_step)
    else:
        h = initial_step(stepper.rhs_y, t_start, stepper.y, f[0] if stepper.quad else f, tab.order,
                         c.rtol, stepper.atol, direction, abs(t_end - t_start),
                         norm=_state_norm(c.norm, stepper.q if quad_tol is not None else None))
    # Adaptive steps are shortened to land on these (an interior output time never shortens one).
    return AdaptiveControl(pi, h, t_start, t_end, stops_between(stops, t_start, t_end), c.min_step,
                           c.max_num_steps, config.callbacks or StepCallbacks(), context, tab)


def fixed_grid(config: SolverConfig, t_eval: Sequence[float], rhs: RHS | None, y0: Tensor | None,
               context: str) -> list[float]:
    """The step boundaries of a fixed-step ``config`` from ``t_eval[0]`` to ``t_eval[-1]`` (see
    :func:`make_grid`; ``rhs`` and ``y0`` are what a ``grid_constructor`` is called with)."""
    c, g = config.control, config.time
    return make_grid(float(t_eval[0]), float(t_eval[-1]), g.step_size, g.grid, t_eval, constructor=g.grid_constructor,
                     rhs=rhs, y0=y0, stops=tuple(g.step_t) + tuple(g.jump_t), max_num_steps=c.max_num_steps,
                     context=context, method=config.method)


def _state_norm(norm, q=None):
    """A custom ``norm(e_y, e_q)`` as a norm of the state's scaled error alone (or None), for the
    initial step heuristic (the quadrature, if error-controlled, enters as zero)."""
    if norm is None:
        return None
    e_q = None if q is None else torch.zeros_like(q)
    return lambda e: norm(e, e_q)


def _no_error(step: StepResult) -> None:
    """A fixed step's error ratio: none is measured."""
    return None


def _error_measure(config: SolverConfig, stepper: Stepper, atol: float | Tensor,
                   quad_tol: tuple | None) -> Callable[[StepResult], float | None]:
    """``ratio(step)``: the solve's error ratio of an attempted step (see :func:`step_error_ratio`;
    ``quad_tol``: ``(q_atol, q_splits)`` where the quadrature is error-controlled)."""
    if not config.adaptive:
        return _no_error
    assert isinstance(stepper, RKStepper)  # adaptive: tableaux only, with their error weights
    b_err = stepper.rows.b_err
    assert b_err is not None
    return lambda step: step_error_ratio(step, config, b_err, atol, quad_tol)


def step_error_ratio(step: StepResult, config: SolverConfig, b_err: StageRow, atol: float | Tensor,
                     quad_tol: tuple | None) -> float:
    """The error ratio of ``step`` (at most 1 accepts it): the built-in RMS per part of the state
    (and of the quadrature, where ``quad_tol = (q_atol, q_splits)``), or ``config.control.norm``.

    The one host sync per step (``.item()``) happens here."""
    h = step.t1 - step.t0
    with torch.no_grad():
        err = combine_stages(None, step.ks, b_err, h)
        y, y_new = step.y0, step.y_new
        if quad_tol is not None:
            q, dq, (q_atol, q_splits) = step.q0, step.dq, quad_tol
            err_q = combine_stages(None, step.dqs, b_err, h)
        else:
            err_q = q = dq = q_atol = q_splits = None
        if config.control.norm is not None:
            return _custom_ratio(config, err, y.detach(), y_new.detach(), atol, err_q, q, dq, q_atol,
                                 quad_tol is not None)
        c = config.control
        ratio = None if err is None else error_ratio(err, y, y_new, c.rtol, atol, c.norm_splits)
        if err_q is not None:
            assert q is not None and dq is not None  # err_q only with a quadrature
            q_det = q.detach()
            r_q = quadrature_error_ratio(err_q, q_det, q_det + dq.detach(), c.rtol, q_atol, q_splits)
            ratio = r_q if ratio is None else torch.maximum(ratio, r_q)
        return 0.0 if ratio is None else ratio.item()


def _custom_ratio(config, err, y, y_new, atol, err_q, q, dq, q_atol, quad_in_norm) -> float:
    """The error ratio by ``config.control.norm`` of the scaled error estimates of ``y`` and ``q``."""
    scale = torch.maximum(y.abs(), y_new.abs()).mul_(config.control.rtol).add_(atol)
    e_y = torch.zeros_like(y) if err is None else err / scale
    e_q = None
    if quad_in_norm:
        q_det = q.detach()
        q_scale = torch.maximum(q_det.abs(), (q_det + dq.detach()).abs()).mul_(config.control.rtol).add_(q_atol)
        e_q = torch.zeros_like(q_det) if err_q is None else err_q / q_scale
    r = config.control.norm(e_y, e_q)
    return float(r.abs() if isinstance(r, torch.Tensor) else abs(r))
