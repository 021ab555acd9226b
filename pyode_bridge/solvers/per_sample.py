"""Per-sample solving (issue 18): every batch row its own times, step size, error test, acceptance
and failure, as variants of the stepping loop's parts driven by the one loop
(:func:`~pyode_bridge.solvers.loop.drive`): :class:`SampleAdaptiveControl` / :class:`SampleGridControl`
/ :class:`SampleReplay` (controls), :class:`SampleStepper`, :func:`sample_error_ratio` and
:class:`SampleOutputs`.

States are ``(B, n)`` (row ``b``: sample ``b``'s flat state); times are float64 ``(B,)`` tensors.
A row that has finished (or failed) takes steps of length 0 and never moves again; a rejected row
stays at its start. One host sync per step decides whether the loop goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .combine import StageRow, combine
from .controller import STRETCH, PIController
from .dense import _dense_matrix
from .loop import SolverConfig, drive, make_grid, stage_rows
from .tableau import ButcherTableau
from .util import fail

__all__ = ["SAMPLE_OK", "SAMPLE_NONFINITE", "SAMPLE_UNDERFLOW", "SAMPLE_MAX_STEPS", "SampleStep",
           "SampleStepper", "SampleAdaptiveControl", "SampleGridControl", "SampleReplay", "SampleOutputs",
           "SampleResult", "sample_error_ratio", "integrate_per_sample", "RowRHS"]

#: ``SolveStats.sample_status`` codes: the row finished; its right-hand side returned NaN/Inf at a
#: finite state (or a fixed step's state became NaN/Inf); its step size underflowed; it reached
#: ``max_num_steps`` attempts.
SAMPLE_OK, SAMPLE_NONFINITE, SAMPLE_UNDERFLOW, SAMPLE_MAX_STEPS = 0, 1, 2, 3

# ``rhs(t (B,) float64, y (B, n)) -> (B, n)``.
RowRHS = Callable[[Tensor, Tensor], Tensor]


@dataclass(eq=False)
class SampleStep:
    """One attempted step of every row from ``t0`` to ``t1`` (``(B,)``; ``t1 == t0`` for rows that
    have stopped). ``y0``/``y_new`` ``(B, n)``, ``ks`` the stages ``[(B, n)] * S``, ``f_new`` an FSAL
    tableau's derivative at ``y_new``; ``moved`` ``(B,)``: the rows whose step stands (set by the
    control's ``judge``, with the output counts; the stepper's ``accept`` then keeps the other rows
    at their start)."""

    t0: Tensor
    t1: Tensor
    y0: Tensor
    y_new: Tensor
    ks: list
    f_new: Tensor | None
    moved: Tensor | None = None
    fast: bool = False  # every row's y_new stands as computed (moved, or a step of 0): no masking
    counts: Tensor | None = None  # (2, B): the output times reached, and those inside the step
    n_out: int = 0  # the most of either over the rows
    n_inner: int = 0

    @property
    def h(self) -> Tensor:
        return self.t1 - self.t0


def _combine(y: Tensor, ks: list, row: StageRow, hy: Tensor) -> Tensor:
    """``y + hy * sum_j row[j] ks[j]`` (``hy`` ``(B, 1)``: each row its own step)."""
    inc = combine(None, [(c, ks[j]) for c, j in zip(row.coefs, row.idx)])
    return y if inc is None else torch.addcmul(y, hy, inc)


class SampleStepper:
    """:class:`~pyode_bridge.solvers.loop.RKStepper`'s contract on ``(B, n)`` states and ``(B,)``
    times (explicit tableaux): ``attempt(t0, t1)`` steps every row by its own ``t1 - t0``;
    ``accept(step)`` moves the rows ``step.moved`` and keeps the others (state and the first stage
    the next step starts from) where they were."""

    def __init__(self, rhs: RowRHS, tab: ButcherTableau, y0: Tensor, carry: bool) -> None:
        self.rhs, self.tab, self.rows, self.carry = rhs, tab, stage_rows(tab), carry
        self.y: Tensor = y0
        self.f: Tensor | None = None
        self.q = None  # no quadrature rides along (the loop's finish reads it)

    def first_stage(self, t: Tensor) -> Tensor:
        """``rhs(t, y)`` at the current state (evaluated once, then carried)."""
        if self.f is None:
            self.f = self.rhs(t, self.y)
        return self.f

    def attempt(self, t0: Tensor, t1: Tensor) -> SampleStep:
        tab, rows, y = self.tab, self.rows, self.y
        h = t1 - t0
        hy = h.to(y.dtype).unsqueeze(1)
        ks = [self.first_stage(t0)]
        y_new = f_new = None
        last = tab.stages - 1
        for i in range(1, tab.stages):
            yi = _combine(y, ks, rows.a[i], hy)
            fi = self.rhs(t0 + tab.c[i] * h, yi)
            if tab.fsal and i == last:
                y_new, f_new = yi, fi
            ks.append(fi)
        if y_new is None:
            y_new = _combine(y, ks, rows.b, hy)
        return SampleStep(t0, t1, y, y_new, ks, f_new)

    def accept(self, step: SampleStep) -> None:
        assert step.moved is not None  # judged
        carried = step.f_new if step.f_new is not None else step.ks[-1] if self.carry else None
        if not step.fast:  # some row was rejected or failed: it stays where it was
            m = step.moved.unsqueeze(1)
            step.y_new = torch.where(m, step.y_new, step.y0)
            carried = None if carried is None else torch.where(m, carried, step.ks[0])
        self.y, self.f = step.y_new, carried


def sample_error_ratio(step: SampleStep, b_err: StageRow, rtol: float, atol: float,
                       splits: Sequence[int] | None) -> Tensor:
    """Each row's error ratio ``(B,)``: the RMS of ``err / (atol + rtol max(|y0|, |y1|))`` over the
    row's own entries (the largest over a tuple state's parts, ``splits`` their per-row sizes), so no
    row's error is diluted by the others'. At most 1 accepts the row's step."""
    with torch.no_grad():
        err = combine(None, [(c, step.ks[j]) for c, j in zip(b_err.coefs, b_err.idx)])
        scale = torch.maximum(step.y0.abs(), step.y_new.abs()).mul_(rtol).add_(atol)
        sq = err.mul_(step.h.to(err.dtype).unsqueeze(1)).div_(scale).square_()
        if splits and len(splits) > 1:
            return torch.stack([p.mean(1) for p in sq.split(list(splits), 1)], 1).amax(1).sqrt_()
        return sq.mean(1).sqrt_()


class _SampleControl:
    """What the per-sample controls share: each row's time, whether it still steps (``active``),
    its status and accepted steps, and the one host sync per step (:meth:`_settle`, which also
    counts the output times the step reaches, for ``outputs``, a :class:`SampleOutputs`)."""

    outputs: SampleOutputs

    def __init__(self, t_start: Tensor, t_end: Tensor, max_num_steps: int, on_failure: str, context: str,
                 method: Any, record: bool) -> None:
        self.t, self.t_end = t_start.clone(), t_end
        self.direction = 1.0 if bool((t_end >= t_start).all()) else -1.0
        self.max_num_steps, self.on_failure, self.context, self.method = max_num_steps, on_failure, context, method
        self.active = t_start != t_end
        self.status = torch.zeros_like(t_start, dtype=torch.long)
        self.sample_steps = torch.zeros_like(self.status)
        self.attempts = torch.zeros_like(self.status)
        self.steps = self.rejected = 0  # steps of the batch: some row moved / none did
        self.record: list | None = [] if record else None
        self.done = not bool(self.active.any())

    def _settle(self, step: SampleStep, moved: Tensor, failed: Tensor, finished: Tensor, still: Tensor) -> bool:
        """Apply a step's outcome: rows ``moved`` advance to ``step.t1``, rows ``failed`` fail
        (``on_failure``: raise naming the row, or stop it), rows ``finished`` stop; ``still``: rows
        whose ``y_new`` is their start already (stopped rows with finite stages: a step of 0)."""
        self.t = torch.where(moved, step.t1, self.t)
        self.sample_steps += moved
        was_active = self.active
        self.active = was_active & ~failed & ~finished
        counts = self.outputs.counts(step.t1, moved)
        flags = torch.stack([failed.any(), self.active.any(), moved.any(), (moved | still).all()])
        any_failed, any_active, any_moved, fast, n_out, n_inner = torch.cat(
            [flags.long(), counts.amax(1)]).tolist()
        if any_failed:
            codes = torch.where(failed, self._codes(step, was_active), 0)
            self.status = torch.where(failed, codes, self.status)
            if self.on_failure == "raise":
                self._raise(step, failed, codes)
        step.moved, step.fast, step.counts, step.n_out, step.n_inner = moved, bool(fast), counts, n_out, n_inner
        self.done = not any_active
        if any_moved:
            self.steps += 1
            if self.record is not None:
                self.record.append((step.t0, step.t1, moved, bool(fast)))
        else:
            self.rejected += 1
        return bool(any_moved)

    def _codes(self, step: SampleStep, was_active: Tensor) -> Tensor:
        """Why each failed row failed (rare: computed only when one did)."""
        raise NotImplementedError

    def _raise(self, step: SampleStep, failed: Tensor, codes: Tensor) -> None:
        b = int(failed.nonzero()[0, 0])
        code, t, t_end = int(codes[b]), float(step.t0[b]), float(self.t_end[b])
        why = {SAMPLE_NONFINITE: f"the right-hand side or the state became NaN/Inf at t={t:.6g}; check "
                                 "func (e.g. log/sqrt/division of the state) or its parameters",
               SAMPLE_UNDERFLOW: f"step size underflow at t={t:.6g}: the error estimate stays above "
                                 "tolerance or the state became NaN/Inf; the row may blow up in finite "
                                 "time or be too stiff for an explicit method",
               SAMPLE_MAX_STEPS: f"reached max_num_steps={self.max_num_steps} at t={t:.6g} before "
                                 f"t={t_end:.6g}; raise options={{'max_num_steps': ...}} or loosen "
                                 "rtol/atol"}[code]
        raise fail(f"row {b} of the batch failed: {why}. options={{'on_failure': 'mask'}} lets the "
                   "other rows finish (this one is NaN from its failure on).", self.context, self.method)


class SampleAdaptiveControl(_SampleControl):
    """:class:`~pyode_bridge.solvers.controller.AdaptiveControl` per row: each row's PI-controlled
    step (``pi``'s law, vectorised), landing on the row's end with the 1% stretch, ``min_step``,
    ``max_step``, underflow and ``max_num_steps``; ``h`` ``(B,)``: the first steps.

    A stopped row keeps ``h = 0``: its proposed step is 0 and it never moves. A row whose error
    ratio is NaN/Inf is rejected with the step cut by ``dfactor`` until it underflows; its code then
    says NaN/Inf where its derivative at the start is not finite (the single solve says it at once)."""

    def __init__(self, pi: PIController, h: Tensor, t_start: Tensor, t_end: Tensor, min_step: float,
                 max_num_steps: int, on_failure: str, context: str, method: Any, record: bool) -> None:
        super().__init__(t_start, t_end, max_num_steps, on_failure, context, method, record)
        self.pi, self.min_step = pi, min_step
        self.h = torch.where(self.active, h.abs().clamp(min=min_step, max=pi.max_step) * self.direction, 0.0)
        # Smallest resolvable step: every t of a row lies between its ends, so AdaptiveControl's
        # max(|t|, scale) is the scale itself, fixed per row.
        scale = torch.maximum(torch.maximum(t_start.abs(), t_end.abs()), (t_end - t_start).abs())
        self.h_floor = 16 * (torch.nextafter(scale, torch.full_like(scale, math.inf)) - scale)
        self.prev_beta = torch.ones_like(h)  # the last accepted ratio ** beta
        self.has_prev = torch.zeros_like(self.active)
        self.after_rejection = torch.zeros_like(self.active)
        self.last = torch.zeros_like(self.active)

    def propose(self) -> tuple[Tensor, Tensor]:
        t, h = self.t, self.h
        self.attempts += self.active
        if self.min_step > 0:
            h = torch.where((h.abs() < self.min_step) & self.active,
                            torch.full_like(h, self.direction * self.min_step), h)
        reach = t + (h * STRETCH if math.isinf(self.pi.max_step)
                     else torch.where(h.abs() * STRETCH > self.pi.max_step, h, h * STRETCH))
        self.last = reach >= self.t_end if self.direction > 0 else reach <= self.t_end
        t1 = torch.where(self.last, self.t_end, t + h)
        self.h = t1 - t  # the step taken: replayable bit for bit
        return t, t1

    def judge(self, ratio: Tensor | None, step: SampleStep) -> bool:
        assert ratio is not None  # measured for every adaptive step
        pi, h, active = self.pi, self.h, self.active
        accepted = active & (ratio <= 1.0)  # False for a NaN ratio
        if self.min_step > 0:
            accepted = accepted | (active & (h.abs() <= self.min_step) & torch.isfinite(ratio))
        # PIController.propose, row by row: integral control until a row's first acceptance, then
        # PI; no growth after a rejection; a NaN/Inf ratio (factor NaN or 0) cuts by dfactor.
        gain = torch.where(self.has_prev, pi.pi_safety * torch.where(accepted, self.prev_beta, 1.0), pi.safety)
        factor = gain * ratio ** torch.where(self.has_prev, -pi.alpha, -1.0 / pi.error_order)
        cap = torch.where(accepted & ~self.after_rejection, pi.ifactor, 1.0)
        h_new = h * torch.minimum(cap, factor.clamp(min=pi.dfactor)).nan_to_num_(pi.dfactor)
        if not math.isinf(pi.max_step):
            h_new = h_new.clamp(-pi.max_step, pi.max_step)
        self.after_rejection = torch.where(active, ~accepted, self.after_rejection)
        self.prev_beta = torch.where(accepted, ratio.clamp(min=1e-4) ** pi.beta, self.prev_beta)
        self.has_prev = self.has_prev | accepted
        under = active & ~accepted & ~(h_new.abs() > self.h_floor)  # NaN-safe
        if self.min_step > 0:
            under = under | (active & ~accepted & (h.abs() <= self.min_step))
        failed = under | (active & (self.attempts > self.max_num_steps))
        moved = accepted & ~failed
        finished = moved & self.last
        self.h = torch.where(active & ~failed & ~finished, h_new, 0.0)
        return self._settle(step, moved, failed, finished, ~active & (ratio == 0))

    def _codes(self, step: SampleStep, was_active: Tensor) -> Tensor:
        nonfinite = ~torch.isfinite(step.ks[0]).all(1)
        return torch.where(self.attempts > self.max_num_steps, SAMPLE_MAX_STEPS,
                           torch.where(nonfinite, SAMPLE_NONFINITE, SAMPLE_UNDERFLOW))


class SampleGridControl(_SampleControl):
    """Fixed steps on each row's own grid (``grids[b]``: row ``b``'s boundaries, as
    :func:`~pyode_bridge.solvers.loop.make_grid` builds them); a row whose state becomes NaN/Inf
    fails."""

    def __init__(self, grids: list[list[float]], like: Tensor, max_num_steps: int, on_failure: str,
                 context: str, method: Any, record: bool) -> None:
        width = max(len(g) for g in grids)
        padded = torch.tensor([g + [g[-1]] * (width - len(g)) for g in grids], dtype=torch.float64)
        self.grid = padded.to(like.device)
        self.n_steps = torch.tensor([len(g) - 1 for g in grids], device=like.device)
        self.i = torch.zeros_like(self.n_steps)
        super().__init__(self.grid[:, 0], self.grid.gather(1, self.n_steps[:, None])[:, 0], max_num_steps,
                         on_failure, context, method, record)

    def propose(self) -> tuple[Tensor, Tensor]:
        nxt = (self.i + 1).clamp(max=self.grid.shape[1] - 1)
        t1 = torch.where(self.active, self.grid.gather(1, nxt[:, None])[:, 0], self.t)
        return self.t, t1

    def judge(self, ratio: Tensor | None, step: SampleStep) -> bool:
        finite = torch.isfinite(step.y_new).all(1)
        failed = self.active & ~finite
        moved = self.active & finite
        self.i += moved
        return self._settle(step, moved, failed, moved & (self.i == self.n_steps), ~self.active & finite)

    def _codes(self, step: SampleStep, was_active: Tensor) -> Tensor:
        return torch.full_like(self.status, SAMPLE_NONFINITE)


class SampleReplay:
    """Replays a recorded per-sample solve (``record``: its steps ``(t0, t1, moved, fast)`` in
    order, the steps that moved no row left out) bit for bit: the checkpointed gradient's
    recomputation."""

    outputs: SampleOutputs

    def __init__(self, record: list) -> None:
        self.record, self.i, self.done = record, 0, not record

    def propose(self) -> tuple[Tensor, Tensor]:
        t0, t1, _, _ = self.record[self.i]
        return t0, t1

    def judge(self, ratio: Tensor | None, step: SampleStep) -> bool:
        _, t1, step.moved, step.fast = self.record[self.i]
        step.counts = counts = self.outputs.counts(t1, step.moved)
        step.n_out, step.n_inner = counts.amax(1).tolist()
        self.i += 1
        self.done = self.i == len(self.record)
        return True


class SampleOutputs:
    """Each row's states at its own output times ``t_eval[b]`` (``(B, T)`` float64), written into
    ``ys`` ``(T, B, n)`` (NaN where a failed row never got to) by the tableau's continuous extension
    (cubic Hermite where it has none or needs extra stages; ``interp="linear"``: linear)."""

    def __init__(self, y0: Tensor, t_eval: Tensor, tab: ButcherTableau, interp: str | None, rhs: RowRHS,
                 direction: float, carry: bool) -> None:
        B, n = y0.shape
        self.t_eval, self.tab, self.interp, self.rhs, self.direction = t_eval, tab, interp, rhs, direction
        self.carry = carry
        self.ys = torch.full((t_eval.shape[1], B, n), math.nan, dtype=y0.dtype, device=y0.device)
        self.ys[0] = y0
        self.next_out = torch.ones(B, dtype=torch.long, device=y0.device)
        self.own_dense = tab.dense is not None and not tab.dense_stages and interp is None

    def counts(self, t1: Tensor, moved: Tensor) -> Tensor:
        """``(2, B)``: for each row that ``moved`` to ``t1``, how many of its output times the step
        reaches, and how many of those lie inside it (need the continuous extension)."""
        ahead = self.t_eval - t1[:, None] if self.direction > 0 else t1[:, None] - self.t_eval
        reached = torch.stack([(ahead <= 0).sum(1), (ahead < 0).sum(1)]) - self.next_out
        return torch.where(moved, reached, 0)

    def emit(self, step: SampleStep, last: Any) -> bool:
        """Write the outputs the accepted ``step`` reaches (counted by the control's ``judge``)."""
        assert step.counts is not None
        count = step.counts[0]
        T, f_end = self.t_eval.shape[1], list[Tensor]()
        for k in range(step.n_out):
            b = (count > k).nonzero()[:, 0]
            j = self.next_out[b] + k
            tj = self.t_eval[b, j.clamp(max=T - 1)]
            value = self._value(step, b, tj, f_end) if step.n_inner > k else step.y_new[b]
            self.ys.index_put_((j, b), value)
        self.next_out += count
        return False

    def _value(self, step: SampleStep, b: Tensor, tj: Tensor, f_end: list) -> Tensor:
        """The rows ``b`` of the step's continuous extension at their times ``tj``."""
        t0, t1, y0, y1 = step.t0[b], step.t1[b], step.y0[b], step.y_new[b]
        h = t1 - t0
        theta = ((tj - t0) / h).unsqueeze(1)
        hy = h.to(y0.dtype).unsqueeze(1)
        if self.interp == "linear":
            val = y0 + theta.to(y0.dtype) * (y1 - y0)
        elif self.own_dense:
            dense = _dense_matrix(self.tab).to(theta.device)  # (P, S)
            powers = theta ** torch.arange(1, dense.shape[0] + 1, dtype=torch.float64, device=theta.device)
            w = (powers @ dense).to(y0.dtype) * hy  # (rows, S)
            val = y0 + sum(w[:, s:s + 1] * k[b] for s, k in enumerate(step.ks))
        else:
            if not f_end:  # the end derivative, evaluated once per step where not at hand
                f_end.append(step.f_new if self.tab.fsal else step.ks[-1] if self.carry
                             else self.rhs(step.t1, step.y_new))
            s = theta.to(y0.dtype)
            h01, h10, h11 = s * s * (3.0 - 2.0 * s), s * (1.0 - s) * (1.0 - s), s * s * (s - 1.0)
            val = y0 + h01 * (y1 - y0) + hy * (h10 * step.ks[0][b] + h11 * f_end[0][b])
        return torch.where((tj == t1).unsqueeze(1), y1, val)

    def finish(self, y: Tensor, q: Any) -> None:
        return None


@dataclass
class SampleResult:
    """Output of :func:`integrate_per_sample`: ``ys`` ``(T, B, n)``, ``sample_steps``/``sample_status``
    ``(B,)``, the batch's ``steps``/``rejected`` (steps where some row / no row moved) and the
    ``record`` of a recorded solve (for :class:`SampleReplay`)."""

    ys: Tensor
    sample_steps: Tensor
    sample_status: Tensor
    steps: int = 0
    rejected: int = 0
    record: list | None = field(default=None)


def _initial_steps(rhs: RowRHS, t0: Tensor, y0: Tensor, f0: Tensor, order: int, rtol: float,
                   atol: float, direction: float, span: Tensor) -> Tensor:
    """:func:`~pyode_bridge.solvers.controller.initial_step` row by row ``(B,)`` (one evaluation)."""
    with torch.no_grad():
        def rms(v: Tensor) -> Tensor:
            return v.square().mean(1).sqrt().to(torch.float64)

        scale = y0.abs().mul(rtol).add_(atol)
        d0, d1 = rms(y0 / scale), rms(f0 / scale)
        small = (d0 < 1e-5) | (d1 < 1e-5) | ~torch.isfinite(d0 / d1)
        h0 = torch.minimum(torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1), span)
        y1 = torch.addcmul(y0, (direction * h0).to(y0.dtype).unsqueeze(1), f0)
        d2 = rms((rhs(t0 + direction * h0, y1) - f0) / scale) / h0
        dmax = torch.maximum(d1, d2)
        h1 = torch.where(dmax <= 1e-15, (h0 * 1e-3).clamp(min=1e-6),
                         (0.01 / dmax) ** (1.0 / (order + 1)))
        return direction * torch.fmin(torch.fmin(100 * h0, h1), span)  # a NaN h1: Python's min


def integrate_per_sample(rhs: RowRHS, y0: Tensor, t_eval: Tensor, config: SolverConfig, *,
                         splits: Sequence[int] | None = None, on_failure: str = "raise",
                         context: str = "forward solve", record: bool = False,
                         replay: list | None = None) -> SampleResult:
    """Integrate every row ``b`` of ``y0`` ``(B, n)`` through its own times ``t_eval[b]``
    (``(B, T)`` float64, rows strictly monotone in one direction) with its own step control.

    ``config``: an explicit Runge-Kutta tableau with its tolerances and step options (adaptive, or
    fixed-step on each row's grid from ``step_size``/``grid`` or its output times). ``splits``: the
    per-row sizes of a tuple state's parts (each error-controlled on its own). ``on_failure``:
    ``"raise"`` or ``"mask"`` (a failed row stops; its outputs after the failure stay NaN).
    ``record``: keep the steps for ``replay`` (the recorded steps, replayed bit for bit).
    Returns a :class:`SampleResult` with ``ys`` ``(T, B, n)``.
    """
    tab = config.tableau
    assert isinstance(tab, ButcherTableau)
    t_start, t_end = t_eval[:, 0].contiguous(), t_eval[:, -1].contiguous()
    direction = 1.0 if bool((t_end >= t_start).all()) else -1.0
    stepper = SampleStepper(rhs, tab, y0, carry=config.adaptive and tab.carry_last)
    measure: Callable[[SampleStep], Tensor | None] = lambda step: None  # noqa: E731
    control: Any
    # Evaluated first in every mode: a replay then builds its graph in the recorded solve's order
    # (autograd sums y0's gradient contributions in that order; bit-for-bit equality needs it).
    f = stepper.first_stage(t_start)
    if replay is not None:
        control = SampleReplay(replay)
    elif config.adaptive:
        pi = PIController(tab.error_order or 1, safety=config.safety, ifactor=config.ifactor,
                          dfactor=config.dfactor, beta=config.beta, max_step=config.max_step)
        if config.first_step is not None:
            h = torch.full_like(t_start, direction * abs(config.first_step))
        else:
            h = _initial_steps(rhs, t_start, y0, f, tab.order, config.rtol, config.atol, direction,
                               (t_end - t_start).abs())
        control = SampleAdaptiveControl(pi, h, t_start, t_end, config.min_step, config.max_num_steps,
                                        on_failure, context, tab, record)
        b_err = stepper.rows.b_err
        assert b_err is not None
        measure = lambda step: sample_error_ratio(step, b_err, config.rtol, config.atol, splits)  # noqa: E731
    else:
        rows = t_eval.tolist()
        grids = []
        for b, times in enumerate(rows):
            try:
                grids.append(make_grid(times[0], times[-1], config.step_size, config.grid, times,
                                       max_num_steps=config.max_num_steps, context=context, method=tab))
            except Exception as e:
                raise type(e)(f"row {b} of the batch: {e}") from e
        control = SampleGridControl(grids, t_start, config.max_num_steps, on_failure, context, tab, record)
    control.outputs = SampleOutputs(y0, t_eval, tab, config.interp, rhs, direction, stepper.carry)
    if not control.done:
        drive(control, stepper, measure, control.outputs)
    if isinstance(control, SampleReplay):
        return SampleResult(control.outputs.ys, torch.zeros(0), torch.zeros(0))
    return SampleResult(control.outputs.ys, control.sample_steps, control.status, control.steps, control.rejected,
                        control.record)
