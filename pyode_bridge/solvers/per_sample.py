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

import numpy as np
import torch
from torch import Tensor

from .combine import StageRow
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
    have stopped), ``h = t1 - t0``. ``y0``/``y_new`` ``(B, n)``, ``ks`` the stages ``[(B, n)] * S``,
    ``f_new`` an FSAL tableau's derivative at ``y_new``; ``moved`` ``(B,)``: the rows whose step
    stands (set by the control's ``judge``, with the output counts; the stepper's ``accept`` then
    keeps the other rows at their start)."""

    t0: Tensor
    t1: Tensor
    h: Tensor
    y0: Tensor
    y_new: Tensor
    ks: list
    f_new: Tensor | None
    moved: Tensor | None = None
    fast: bool = False  # every row's y_new stands as computed (moved, or a step of 0): no masking
    count: np.ndarray | None = None  # (B,): the output times the step reaches
    inner: np.ndarray | None = None  # (B,): those of them inside the step
    host: tuple | None = None  # (t0, t1) as float64 host arrays, where the stepper was given them


_NODES: dict[tuple[int, torch.device], tuple[ButcherTableau, Tensor]] = {}


def _nodes(tab: ButcherTableau, device: torch.device) -> Tensor:
    """The tableau's nodes ``c`` as a float64 ``(S, 1)`` tensor on ``device``, made once (keyed by
    the tableau's identity, the entry keeping it alive, as :func:`~pyode_bridge.solvers.loop.
    stage_rows` does)."""
    entry = _NODES.get((id(tab), device))
    if entry is None or entry[0] is not tab:
        if len(_NODES) >= 64:  # tableaux made on the fly must not accumulate here
            _NODES.clear()
        entry = _NODES[(id(tab), device)] = (tab, torch.tensor(tab.c, dtype=torch.float64, device=device).unsqueeze(1))
    return entry[1]


def _increment(ks: list, row: StageRow) -> Tensor | None:
    """``sum_j row[j] ks[j]`` ``(B, n)``: several stages as one product with the row's weights (one
    autograd node for the stack and one for the product, instead of one per term)."""
    idx = row.idx
    if len(idx) < 2:
        return ks[idx[0]] * row.coefs[0] if idx else None
    stages = torch.stack([ks[j] for j in idx], -1)
    return torch.matmul(stages, row.tensor(stages.dtype, stages.device))


def _combine(y: Tensor, ks: list, row: StageRow, hy: Tensor) -> Tensor:
    """``y + hy * sum_j row[j] ks[j]`` (``hy`` ``(B, 1)``: each row its own step)."""
    inc = _increment(ks, row)
    return y if inc is None else torch.addcmul(y, hy, inc)


class SampleStepper:
    """:class:`~pyode_bridge.solvers.loop.RKStepper`'s contract on ``(B, n)`` states and ``(B,)``
    times (explicit tableaux): ``attempt(t0, t1)`` steps every row by its own ``t1 - t0``;
    ``accept(step)`` moves the rows ``step.moved`` and keeps the others (state and the first stage
    the next step starts from) where they were."""

    def __init__(self, rhs: RowRHS, tab: ButcherTableau, y0: Tensor, carry: bool,
                 on_accept: Callable[[SampleStep], None] | None = None, jumps: Tensor | None = None,
                 time_dtype: torch.dtype = torch.float64, direction: float = 1.0) -> None:
        self.rhs, self.tab, self.rows, self.carry = rhs, tab, stage_rows(tab), carry
        self.c = _nodes(tab, y0.device)  # (S, 1) float64
        self.y: Tensor = y0
        self.f: Tensor | None = None
        self.q = None  # no quadrature rides along (the loop's finish reads it)
        # Called with every accepted step; a step then starts from a fresh first stage (an adjoint
        # sweep integrates its parameter quadrature from the step's own evaluations).
        self.on_accept = on_accept
        # Each row's jump_t times (B, J) (None: no row has one): func is evaluated just inside a
        # step at these, in the dtype func receives t in (joint mode's boundary_rhs, row by row).
        self.jumps, self.time_dtype, self.direction = jumps, time_dtype, direction
        self.refresh: Tensor | None = None  # (B, 1): rows whose carried first stage is a jump's other side

    def first_stage(self, t: Tensor) -> Tensor:
        """``rhs(t, y)`` at the current state (evaluated once, then carried; just after a jump_t for
        the rows that start on one)."""
        if self.f is None or self.refresh is not None:
            f = self.rhs(t if self.jumps is None else self.inside(t.unsqueeze(0), t, t)[0], self.y)
            self.f = f if self.refresh is None or self.f is None else torch.where(self.refresh, f, self.f)
            self.refresh = None
        return self.f

    def inside(self, ts: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
        """The stage times ``ts`` ``(S, B)`` with those ``func`` would receive as a row's step end
        that is one of its jumps moved to the next representable time inside the step (the start
        wins where the step has length 0)."""
        assert self.jumps is not None
        dt = self.time_dtype
        r0, r1, rs = t0.to(dt), t1.to(dt), ts.to(dt)
        at0 = (t0.unsqueeze(1) == self.jumps).any(1) & (rs == r0)
        at1 = (t1.unsqueeze(1) == self.jumps).any(1) & (rs == r1)
        toward = torch.full_like(r0, self.direction * math.inf)
        ts = torch.where(at1, torch.nextafter(r1, -toward).to(ts.dtype), ts)
        return torch.where(at0, torch.nextafter(r0, toward).to(ts.dtype), ts)

    def attempt(self, t0_host: np.ndarray, t1_host: np.ndarray) -> SampleStep:
        """Step every row from ``t0_host`` to ``t1_host`` (float64 ``(B,)`` host arrays)."""
        tab, rows, y = self.tab, self.rows, self.y
        t0, t1 = _dev(t0_host, y), _dev(t1_host, y)
        h = t1 - t0
        hy = (h if y.dtype == torch.float64 else h.to(y.dtype)).unsqueeze(1)
        ts = self.c * h + t0  # (S, B): every stage's times in two operations, not two per stage
        if self.jumps is not None:
            ts = self.inside(ts, t0, t1)
        stage_t = ts.unbind(0)  # one operation, not one select per stage
        ks = [self.first_stage(t0)]
        y_new = f_new = None
        last = tab.stages - 1
        for i in range(1, tab.stages):
            yi = _combine(y, ks, rows.a[i], hy)
            fi = self.rhs(stage_t[i], yi)
            if tab.fsal and i == last:
                y_new, f_new = yi, fi
            ks.append(fi)
        if y_new is None:
            y_new = _combine(y, ks, rows.b, hy)
        return SampleStep(t0, t1, h, y, y_new, ks, f_new, host=(t0_host, t1_host))

    def accept(self, step: SampleStep) -> None:
        assert step.moved is not None  # judged
        carried = step.f_new if step.f_new is not None else step.ks[-1] if self.carry else None
        if not step.fast:  # some row was rejected or failed: it stays where it was
            m = step.moved.unsqueeze(1)
            step.y_new = torch.where(m, step.y_new, step.y0)
            carried = None if carried is None else torch.where(m, carried, step.ks[0])
        self.y, self.f = step.y_new, carried
        if self.jumps is not None and carried is not None:
            # A row that moved onto a jump starts its next step from the derivative after it.
            ends = ((step.t1.unsqueeze(1) == self.jumps).any(1) & step.moved).unsqueeze(1)
            self.refresh = ends if bool(ends.any()) else None
        if self.on_accept is not None:
            self.on_accept(step)
            self.f, self.refresh = None, None


def sample_error_ratio(step: SampleStep, b_err: StageRow, rtol: float, atol: float,
                       splits: Sequence[int] | None) -> Tensor:
    """Each row's error ratio ``(B,)`` divided by its step ``|h|``: the RMS of
    ``sum_j b_err[j] k_j / (atol + rtol max(|y0|, |y1|))`` over the row's own entries (the largest
    over a tuple state's parts, ``splits`` their per-row sizes), so no row's error is diluted by the
    others'. The control multiplies by ``|h|`` on the host (one device operation fewer per step);
    at most 1 accepts the row's step."""
    with torch.no_grad():
        err = _increment(step.ks, b_err)
        assert err is not None  # an adaptive tableau's error row is never all zeros
        err = err.div_(torch.maximum(step.y0.abs(), step.y_new.abs()).mul_(rtol).add_(atol))
        if not splits or len(splits) == 1:
            return torch.linalg.vector_norm(err, dim=1).div_(math.sqrt(err.shape[1]))
        return torch.stack([torch.linalg.vector_norm(p, dim=1).div_(math.sqrt(p.shape[1]))
                            for p in err.split(list(splits), 1)], 1).amax(1)


def _dev(a: np.ndarray, like: Tensor) -> Tensor:
    """A host array on ``like``'s device (no copy on the CPU: the controls never change an array
    in place once it is handed out; ``from_numpy`` there, without ``as_tensor``'s dispatch)."""
    return torch.from_numpy(a) if like.device.type == "cpu" else torch.as_tensor(a, device=like.device)


class _SampleControl:
    """What the per-sample controls share: each row's time, whether it still steps (``active``),
    its status and accepted steps, and the settling of a judged step (:meth:`_settle`).

    The decisions are made on the host in float64 NumPy arrays ``(B,)``: the step's error ratios
    come over in the one host sync per step, and ``propose`` hands the stepper the step's ends as
    host arrays (the outputs' continuous extension reads their times there too). On the host,
    each of the ~50 small operations of a step's decision costs about a microsecond; as torch
    operations it would cost several, about a fifth of a small field's step."""

    outputs: SampleOutputs

    def __init__(self, t_start: np.ndarray, t_end: np.ndarray, like: Tensor, max_num_steps: int,
                 on_failure: str, context: str, method: Any, record: bool) -> None:
        self.t, self.t1, self.t_end, self.like = t_start, t_start, t_end, like
        self.all_moved = _dev(np.ones(len(t_start), dtype=bool), like)  # step.moved of most steps
        self.direction = 1.0 if bool((t_end >= t_start).all()) else -1.0
        self.max_num_steps, self.on_failure, self.context, self.method = max_num_steps, on_failure, context, method
        self.active = t_start != t_end
        self.status = np.zeros(len(t_start), dtype=np.int64)
        self.sample_steps = np.zeros_like(self.status)
        self.attempts = np.zeros_like(self.status)
        self.steps = self.rejected = 0  # steps of the batch: some row moved / none did
        self.record: list | None = [] if record else None
        self.done = not bool(self.active.any())

    def _settle(self, step: SampleStep, moved: np.ndarray, failed: np.ndarray | None, finished: np.ndarray,
                still: Callable[[], np.ndarray]) -> bool:
        """Apply a step's outcome: rows ``moved`` advance to ``step.t1``, rows ``failed`` fail
        (``on_failure``: raise naming the row, or stop it; None: no row failed), rows ``finished``
        stop; ``still()``: rows whose ``y_new`` is their start already (stopped rows with finite
        stages: a step of 0), asked for only where some row did not move."""
        every, start = bool(moved.all()), self.t
        self.t = self.t1 if every else np.where(moved, self.t1, start)
        self.sample_steps += moved
        was_active = self.active
        self.active = was_active & ~finished if failed is None else was_active & ~failed & ~finished
        if failed is not None:
            codes = np.where(failed, self._codes(step, was_active), 0)
            self.status = np.where(failed, codes, self.status)
            if self.on_failure == "raise":
                self._raise(step, failed, codes)
        step.moved = self.all_moved if every else _dev(moved, self.like)
        step.fast = every or bool((moved | still()).all())
        step.count, step.inner = self.outputs.counts(self.t1, moved)
        self.done = not self.active.any()
        if not moved.any():
            self.rejected += 1
            return False
        self.steps += 1
        if self.record is not None:
            self.record.append((start, self.t1, step.moved, step.fast, step.count, step.inner))
        return True

    def stop(self, rows: np.ndarray) -> None:
        """End the rows ``rows`` (``(B,)`` bool) where they are, finished (an event found there):
        they take steps of length 0 from now on."""
        self.active = self.active & ~rows
        self.done = not self.active.any()

    def _codes(self, step: SampleStep, was_active: np.ndarray) -> np.ndarray:
        """Why each failed row failed (rare: computed only when one did)."""
        raise NotImplementedError

    def _raise(self, step: SampleStep, failed: np.ndarray, codes: np.ndarray) -> None:
        b = int(failed.nonzero()[0][0])
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
    says NaN/Inf where its derivative at the start is not finite (the single solve says it at once).
    ``stops`` ``(B, K)``: each row's ``step_t``/``jump_t``; its steps land on those strictly inside
    its interval (as :class:`~pyode_bridge.solvers.controller.AdaptiveControl` does)."""

    def __init__(self, pi: PIController, h: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, like: Tensor,
                 min_step: float, max_num_steps: int, on_failure: str, context: str, method: Any,
                 record: bool, stops: np.ndarray | None = None) -> None:
        super().__init__(t_start, t_end, like, max_num_steps, on_failure, context, method, record)
        self.pi, self.min_step = pi, min_step
        # targets[b, k]: row b's k-th stop, then its end; k[b]: the next one (None: no stops).
        self.targets: np.ndarray | None = None
        self.k = self.n_stops = np.zeros(len(t_start), dtype=np.int64)
        if stops is not None and stops.shape[1]:
            d = self.direction
            inside = (d * (stops - t_start[:, None]) > 0) & (d * (t_end[:, None] - stops) > 0)
            key = np.sort(np.where(inside, d * stops, np.inf), 1)
            key[:, 1:][key[:, 1:] == key[:, :-1]] = np.inf  # a time given twice is one stop
            key = np.sort(key, 1)
            self.n_stops = np.isfinite(key).sum(1)
            self.targets = np.where(np.isfinite(key), d * key, t_end[:, None])
            self.targets = np.concatenate([self.targets, t_end[:, None]], 1)
            self.rows = np.arange(len(t_start))
        # np.minimum/np.maximum: np.clip's result at a fifth of its cost.
        self.h = np.where(self.active, np.minimum(np.maximum(np.abs(h), min_step), pi.max_step) * self.direction,
                          0.0)
        # Smallest resolvable step: every t of a row lies between its ends, so AdaptiveControl's
        # max(|t|, scale) is the scale itself, fixed per row.
        scale = np.maximum(np.maximum(np.abs(t_start), np.abs(t_end)), np.abs(t_end - t_start))
        self.h_floor = 16 * (np.nextafter(scale, np.inf) - scale)
        self.prev_beta = np.ones_like(self.h)  # the last accepted ratio ** beta
        self.has_prev = np.zeros_like(self.active)
        self.after_rejection = np.zeros_like(self.active)
        self.last = self.hit = np.zeros_like(self.active)
        self.proposals = 0  # the batch's: no row has made more attempts

    def propose(self) -> tuple[np.ndarray, np.ndarray]:
        t, h, pi = self.t, self.h, self.pi
        self.attempts += self.active
        self.proposals += 1
        if self.min_step > 0:
            h = np.where((np.abs(h) < self.min_step) & self.active, self.direction * self.min_step, h)
        reach = t + (h * STRETCH if math.isinf(pi.max_step)
                     else np.where(np.abs(h) * STRETCH > pi.max_step, h, h * STRETCH))
        target = self.t_end if self.targets is None else self.targets[self.rows, self.k]
        self.hit = reach >= target if self.direction > 0 else reach <= target
        self.last = self.hit if self.targets is None else self.hit & (self.k == self.n_stops)
        self.t1 = np.where(self.hit, target, t + h)
        self.h = self.t1 - t  # the step taken: replayable bit for bit
        if self.min_step > 0:  # asked for at min_step, though t + min_step - t may round above it
            self.at_min_step = (np.abs(h) <= self.min_step) | (np.abs(self.h) <= self.min_step)
        return t, self.t1

    def judge(self, ratio: Tensor | None, step: SampleStep) -> bool:
        assert ratio is not None  # measured for every adaptive step
        pi, h, active = self.pi, self.h, self.active
        abs_h = np.abs(h)
        with np.errstate(all="ignore"):  # NaN/Inf ratios and 0 ** -alpha are handled below
            r = ratio.cpu().numpy() * abs_h  # the step's one host sync (see sample_error_ratio)
            accepted = active & (r <= 1.0)  # False for a NaN ratio
            if self.min_step > 0:
                accepted |= active & self.at_min_step & np.isfinite(r)
            h_new = pi.propose_rows(h, r, accepted, self.prev_beta, self.has_prev, self.after_rejection)
            self.prev_beta = np.where(accepted, np.maximum(r, 1e-4) ** pi.beta, self.prev_beta)
        rejected = active ^ accepted  # accepted rows are active
        self.after_rejection = np.where(active, rejected, self.after_rejection)
        self.has_prev = self.has_prev | accepted
        # No row can fail where none was rejected and the batch has not made max_num_steps attempts
        # (the common step: the failure tests below are skipped, with the same outcome).
        failed = None
        if rejected.any() or self.proposals > self.max_num_steps:
            under = rejected & ~(np.abs(h_new) > self.h_floor)  # NaN-safe
            if self.min_step > 0:
                under |= rejected & self.at_min_step
            failed = under | (active & (self.attempts > self.max_num_steps))
            if not failed.any():
                failed = None
        moved = accepted if failed is None else accepted & ~failed
        finished = moved & self.last
        if self.targets is not None:
            self.k = self.k + (moved & self.hit & ~self.last)
        self.h = np.where(active & ~(finished if failed is None else failed | finished), h_new, 0.0)
        return self._settle(step, moved, failed, finished, lambda: ~active & (r == 0))

    def stop(self, rows: np.ndarray) -> None:
        super().stop(rows)
        self.h = np.where(rows, 0.0, self.h)

    def _codes(self, step: SampleStep, was_active: np.ndarray) -> np.ndarray:
        nonfinite = (~torch.isfinite(step.ks[0]).all(1)).cpu().numpy()
        return np.where(self.attempts > self.max_num_steps, SAMPLE_MAX_STEPS,
                        np.where(nonfinite, SAMPLE_NONFINITE, SAMPLE_UNDERFLOW))


class SampleGridControl(_SampleControl):
    """Fixed steps on each row's own grid (``grids[b]``: row ``b``'s boundaries, as
    :func:`~pyode_bridge.solvers.loop.make_grid` builds them); a row whose state becomes NaN/Inf
    fails."""

    def __init__(self, grids: list[list[float]], like: Tensor, max_num_steps: int, on_failure: str,
                 context: str, method: Any, record: bool) -> None:
        width = max(len(g) for g in grids)
        self.grid = np.array([g + [g[-1]] * (width - len(g)) for g in grids], dtype=np.float64)
        self.n_steps = np.array([len(g) - 1 for g in grids])
        self.i = np.zeros_like(self.n_steps)
        self.rows = np.arange(len(grids))
        super().__init__(self.grid[:, 0].copy(), self.grid[self.rows, self.n_steps], like, max_num_steps,
                         on_failure, context, method, record)

    def propose(self) -> tuple[np.ndarray, np.ndarray]:
        nxt = np.minimum(self.i + 1, self.grid.shape[1] - 1)
        self.t1 = np.where(self.active, self.grid[self.rows, nxt], self.t)
        return self.t, self.t1

    def judge(self, ratio: Tensor | None, step: SampleStep) -> bool:
        finite = torch.isfinite(step.y_new).all(1).cpu().numpy()  # the step's one host sync
        active = self.active
        failed = active & ~finite
        moved = active & finite
        self.i = self.i + moved
        return self._settle(step, moved, failed if failed.any() else None, moved & (self.i == self.n_steps),
                            lambda: ~active & finite)

    def _codes(self, step: SampleStep, was_active: np.ndarray) -> np.ndarray:
        return np.full_like(self.status, SAMPLE_NONFINITE)


class SampleReplay:
    """Replays a recorded per-sample solve (``record``: each step's ``(t0, t1, moved, fast, count,
    inner)`` in order, the ends as host arrays, the steps that moved no row left out) bit for bit:
    the checkpointed gradient's recomputation."""

    outputs: SampleOutputs

    def __init__(self, record: list) -> None:
        self.record, self.i, self.done = record, 0, not record

    def propose(self) -> tuple[np.ndarray, np.ndarray]:
        t0, t1 = self.record[self.i][:2]
        return t0, t1

    def judge(self, ratio: Tensor | None, step: SampleStep) -> bool:
        step.moved, step.fast, step.count, step.inner = self.record[self.i][2:]
        self.i += 1
        self.done = self.i == len(self.record)
        return True


class SampleOutputs:
    """Each row's states at its own output times ``t_eval[b]`` (``(B, T)`` float64), written into
    ``ys`` ``(T, B, n)`` (NaN where a failed row never got to) by the tableau's continuous extension
    (cubic Hermite where it has none or needs extra stages; ``interp="linear"``: linear)."""

    def __init__(self, y0: Tensor, t_eval: Tensor, tab: ButcherTableau, interp: str | None, rhs: RowRHS,
                 direction: float, carry: bool, t_host: np.ndarray | None = None) -> None:
        B, n = y0.shape
        self.t_eval, self.tab, self.interp, self.rhs, self.direction = t_eval, tab, interp, rhs, direction
        self.t_host = t_eval.cpu().numpy() if t_host is None else t_host  # (B, T) float64, read only
        self.carry = carry
        self.ys = torch.full((t_eval.shape[1], B, n), math.nan, dtype=y0.dtype, device=y0.device)
        self.ys[0] = y0
        self.writes: list[tuple[Tensor, Tensor, Tensor]] = []  # (j, b, value): ys[j, b] = value, at finish
        self.next_out = np.ones(B, dtype=np.int64)
        # Each row's next output time (past its last: infinitely far ahead), so that a step reaching
        # none (most steps) is told in three small operations instead of counting over (B, T).
        self.pending = np.concatenate([self.t_host, np.full((B, 1), direction * math.inf)], 1)
        self.t_next = self.pending[:, 1].copy()
        self.none = np.zeros(B, dtype=np.int64)
        self.row_ids = np.arange(B)
        self.own_dense = tab.dense is not None and interp is None
        self.dense: tuple[Tensor, Tensor] | None = None  # (P, S) weights and the powers 1..P, on y0's device
        # on_step(self, step, extra): every accepted step with its dense output's evaluations
        # (the interpolating adjoints keep them; :meth:`value` reads them again); it may return the
        # rows ((B,) bool) that end there (per-sample events), handed to ``stop`` (the control's).
        self.on_step: Callable[[SampleOutputs, SampleStep, list], np.ndarray | None] | None = None
        self.stop: Callable[[np.ndarray], None] | None = None
        # SampleStepper.inside where rows have jump_t: the extension's own evaluations at a jump are
        # made on the step's side of it, as the stages are (None: no row has a jump).
        self.inside: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def counts(self, t1: np.ndarray, moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row that ``moved`` to ``t1`` ``(B,)``: how many of its output times the step
        reaches, and how many of those lie inside it (they need the continuous extension).
        ``(self.none, self.none)`` where the step reaches none."""
        reach = t1 >= self.t_next if self.direction > 0 else t1 <= self.t_next
        if not (reach & moved).any():
            return self.none, self.none
        ahead = self.t_host - t1[:, None] if self.direction > 0 else t1[:, None] - self.t_host
        reached = np.where(moved, (ahead <= 0).sum(1) - self.next_out, 0)
        return reached, np.where(moved, (ahead < 0).sum(1) - self.next_out, 0)

    def emit(self, step: SampleStep, last: Any) -> bool:
        """Write the outputs the accepted ``step`` reaches (counted by the control's ``judge``)."""
        count, inner = step.count, step.inner
        assert count is not None and inner is not None
        extra = list[Tensor]()  # evaluated at most once per step: dense stages, or an end derivative
        if count is not self.none:
            self._write(step, count, inner, extra)
        if self.on_step is not None:
            self.fill(step, extra)
            ended = self.on_step(self, step, extra)
            if ended is not None and ended.any():
                assert self.stop is not None  # set with on_step by integrate_per_sample
                self.stop(ended)
        return False

    def _write(self, step: SampleStep, count: np.ndarray, inner: np.ndarray, extra: list) -> None:
        """Write the ``count[b]`` outputs each row ``b`` reaches (``inner[b]`` of them inside the step)."""
        first = self.next_out
        if not inner.any() and (count == 1).all() and (first == first[0]).all():
            # Every row reaches the same output at its step's end (a batch of common times): one copy.
            self.ys[int(first[0])] = step.y_new
        else:
            for k in range(int(count.max())):
                rows = (count > k).nonzero()[0]
                b, j = _dev(rows, self.ys), _dev(first[rows] + k, self.ys)
                if (inner[rows] > k).any():
                    value = self._extend(step, b, *self._weights_at(step, rows, first[rows] + k), extra)
                else:
                    value = step.y_new[b]
                self.writes.append((j, b, value))
        self.next_out = first + count
        self.t_next = self.pending[self.row_ids, self.next_out]

    def fill(self, step: SampleStep, extra: list) -> None:
        """Make the step's evaluations beyond its stages, of every row, if not made yet: the dense
        stages (dopri8; ``extra``: all stages), or the end derivative of cubic Hermite."""
        if extra or self.interp == "linear":
            return
        if self.own_dense:  # RKDenseStep.stage_values
            ks, hs = list(step.ks), step.h.to(step.y0.dtype).unsqueeze(1)
            for c, row in self.tab.dense_stages or ():
                yi = step.y0 + hs * sum(a * k for a, k in zip(row, ks) if a != 0.0)
                ks.append(self.rhs(self._inside(step.t0 + c * step.h, step), yi))
            extra.extend(ks)
        else:  # evaluated where not at hand
            extra.append(step.f_new if self.tab.fsal else step.ks[-1] if self.carry
                         else self.rhs(self._inside(step.t1, step), step.y_new))

    def _inside(self, t: Tensor, step: SampleStep) -> Tensor:
        """The times ``t`` ``(B,)`` of an evaluation in ``step``, with a row's step end that is one
        of its jumps moved inside the step (the derivative on the step's side of the jump: the
        other side's would bend the extension of the step that ends there)."""
        return t if self.inside is None else self.inside(t.unsqueeze(0), step.t0, step.t1)[0]

    def value(self, step: SampleStep, b: Tensor, tj: Tensor, extra: list) -> Tensor:
        """The rows ``b`` of the step's continuous extension at their times ``tj`` (``extra``: the
        step's evaluations beyond its stages, made on first use and kept for its other outputs)."""
        t0, t1 = step.t0[b], step.t1[b]
        h = t1 - t0
        return self._extend(step, b, ((tj - t0) / h).unsqueeze(1), h.to(step.y0.dtype).unsqueeze(1),
                            (tj == t1).unsqueeze(1), extra)

    def _weights_at(self, step: SampleStep, rows: np.ndarray, j: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`value`'s ``theta``, ``hy`` and ``at_end`` for the rows ``rows`` at their output
        times ``j``, from the step's host times (the same IEEE operations, without device ones)."""
        assert step.host is not None  # made by the stepper
        t0, t1 = (a[rows] for a in step.host)
        h, tj = t1 - t0, self.t_host[rows, j]
        like = self.ys
        return (_dev(((tj - t0) / h)[:, None], like), _dev(h[:, None], like).to(like.dtype),
                _dev((tj == t1)[:, None], like))

    def _extend(self, step: SampleStep, b: Tensor, theta: Tensor, hy: Tensor, at_end: Tensor,
                extra: list) -> Tensor:
        """The rows ``b`` of the step's continuous extension at ``theta`` ``(rows, 1)`` (float64,
        the fraction of the step), ``hy`` ``(rows, 1)`` their steps; ``at_end``: the rows whose
        time is the step's end (they get ``y_new`` exactly)."""
        y0, y1 = step.y0[b], step.y_new[b]
        self.fill(step, extra)
        if self.interp == "linear":
            val = y0 + theta.to(y0.dtype) * (y1 - y0)
        elif self.own_dense:
            if self.dense is None or self.dense[0].device != theta.device:
                dense = _dense_matrix(self.tab).to(theta.device)  # (P, S)
                self.dense = dense, torch.arange(1, dense.shape[0] + 1, dtype=torch.float64, device=theta.device)
            dense, exponents = self.dense
            powers = theta ** exponents
            w = (powers @ dense).to(y0.dtype) * hy  # (rows, S)
            val = y0 + sum(w[:, s:s + 1] * k[b] for s, k in enumerate(extra))
        else:
            s = theta.to(y0.dtype)
            h01, h10, h11 = s * s * (3.0 - 2.0 * s), s * (1.0 - s) * (1.0 - s), s * s * (s - 1.0)
            val = y0 + h01 * (y1 - y0) + hy * (h10 * step.ks[0][b] + h11 * extra[0][b])
        return torch.where(at_end, y1, val)

    def finish(self, y: Tensor, q: Any) -> None:
        """Write the outputs kept by :meth:`_write` into ``ys``, all in one operation (one autograd
        node instead of one per step: on a batch of rows with their own times, most steps write
        some row's output)."""
        if self.writes:
            js, bs, values = zip(*self.writes)
            self.writes = []
            if len(values) == 1:
                self.ys.index_put_((js[0], bs[0]), values[0])
            else:
                self.ys.index_put_((torch.cat(js), torch.cat(bs)), torch.cat(values))


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
                   atol: float, direction: float, span: np.ndarray) -> np.ndarray:
    """:func:`~pyode_bridge.solvers.controller.initial_step` row by row, ``(B,)`` on the host (one
    evaluation; the norms come over in two host syncs, the rest is host arithmetic)."""
    with torch.no_grad():
        root_n = math.sqrt(y0.shape[1])
        scale = y0.abs().mul_(rtol).add_(atol)
        d0, d1 = torch.stack([torch.linalg.vector_norm(v / scale, dim=1) for v in (y0, f0)]).cpu().numpy() / root_n
        with np.errstate(all="ignore"):
            small = (d0 < 1e-5) | (d1 < 1e-5) | ~np.isfinite(d0 / d1)
            h0 = np.minimum(np.where(small, 1e-6, 0.01 * d0 / d1), span)
        step = _dev(direction * h0, y0)
        y1 = torch.addcmul(y0, step.to(y0.dtype).unsqueeze(1), f0)
        f1 = rhs(t0 + step, y1)
        d2 = torch.linalg.vector_norm((f1 - f0) / scale, dim=1).cpu().numpy() / root_n
        with np.errstate(all="ignore"):  # h0 = 0 for a row whose span is 0 (it never steps)
            d2 = d2 / h0
            dmax = np.maximum(d1, d2)
            h1 = np.where(dmax <= 1e-15, np.maximum(1e-6, h0 * 1e-3), (0.01 / dmax) ** (1.0 / (order + 1)))
        return direction * np.fmin(np.fmin(100 * h0, h1), span)  # a NaN h1: Python's min


def integrate_per_sample(rhs: RowRHS, y0: Tensor, t_eval: Tensor, config: SolverConfig, *,
                         splits: Sequence[int] | None = None, on_failure: str = "raise",
                         context: str = "forward solve", record: bool = False,
                         replay: list | None = None,
                         on_accept: Callable[[SampleStep], None] | None = None,
                         on_step: Callable[[SampleOutputs, SampleStep, list], np.ndarray | None] | None = None,
                         stops: tuple[np.ndarray, np.ndarray] | None = None,
                         time_dtype: torch.dtype = torch.float64,
                         first_steps: np.ndarray | None = None) -> SampleResult:
    """Integrate every row ``b`` of ``y0`` ``(B, n)`` through its own times ``t_eval[b]``
    (``(B, T)`` float64, rows strictly monotone in one direction) with its own step control.

    ``config``: an explicit Runge-Kutta tableau with its tolerances and step options (adaptive, or
    fixed-step on each row's grid from ``step_size``/``grid`` or its output times). ``splits``: the
    per-row sizes of a tuple state's parts (each error-controlled on its own). ``on_failure``:
    ``"raise"`` or ``"mask"`` (a failed row stops; its outputs after the failure stay NaN).
    ``record``: keep the steps for ``replay`` (the recorded steps, replayed bit for bit).
    ``on_accept(step)``: called with each accepted step (see :class:`SampleStepper`).
    ``on_step(outputs, step, extra)``: called with each accepted step after its outputs, its dense
    output's evaluations made (see :attr:`SampleOutputs.on_step`); it may return the rows
    (``(B,)`` bool) that end there, which then take no more steps (an event found).
    ``stops``: each row's ``(step_t, jump_t)``, float64 ``(B, K)`` each (``K`` may be 0): its steps
    land on them, and ``func`` (receiving ``t`` in ``time_dtype``) is evaluated just inside a step
    at a jump. ``first_steps``: each row's first step ``(B,)`` (its size; adaptive methods), in
    place of ``options["first_step"]`` and the initial step estimate (an event search continuing
    with the steps it has reached).
    Returns a :class:`SampleResult` with ``ys`` ``(T, B, n)``.
    """
    tab = config.method
    assert isinstance(tab, ButcherTableau)
    t_start = t_eval[:, 0].contiguous()
    t_host = t_eval.cpu().numpy()  # the one host copy of the times (the outputs read it too)
    t0_host, t1_host = t_host[:, 0].copy(), t_host[:, -1].copy()
    direction = 1.0 if bool((t1_host >= t0_host).all()) else -1.0
    step_t, jump_t = stops if stops is not None else (np.zeros((len(t0_host), 0)),) * 2
    stepper = SampleStepper(rhs, tab, y0, carry=config.adaptive and tab.carry_last, on_accept=on_accept,
                            jumps=_dev(jump_t, y0) if jump_t.shape[1] else None, time_dtype=time_dtype,
                            direction=direction)
    measure: Callable[[SampleStep], Tensor | None] = lambda step: None  # noqa: E731
    control: Any
    # Evaluated first in every mode: a replay then builds its graph in the recorded solve's order
    # (autograd sums y0's gradient contributions in that order; bit-for-bit equality needs it).
    f = stepper.first_stage(t_start)
    if replay is not None:
        control = SampleReplay(replay)
    elif config.adaptive:
        ctl = config.control
        pi = PIController(tab.error_order or 1, safety=ctl.safety, ifactor=ctl.ifactor, dfactor=ctl.dfactor,
                          beta=ctl.beta, max_step=ctl.max_step)
        if first_steps is not None:
            h = direction * np.abs(first_steps)
        elif ctl.first_step is not None:
            h = np.full_like(t0_host, direction * abs(ctl.first_step))
        else:
            h = _initial_steps(rhs, t_start, y0, f, tab.order, ctl.rtol, ctl.atol, direction,
                               np.abs(t1_host - t0_host))
        stops_all = np.concatenate([step_t, jump_t], 1) if step_t.shape[1] or jump_t.shape[1] else None
        control = SampleAdaptiveControl(pi, h, t0_host, t1_host, t_start, ctl.min_step, ctl.max_num_steps,
                                        on_failure, context, tab, record, stops_all)
        b_err = stepper.rows.b_err
        assert b_err is not None
        measure = lambda step: sample_error_ratio(step, b_err, ctl.rtol, ctl.atol, splits)  # noqa: E731
    else:
        rows = t_eval.tolist()
        grids = []
        for b, times in enumerate(rows):
            try:
                grids.append(make_grid(times[0], times[-1], config.time.step_size, config.time.grid, times,
                                       stops=[*step_t[b], *jump_t[b]],
                                       max_num_steps=config.control.max_num_steps, context=context, method=tab))
            except Exception as e:
                raise type(e)(f"row {b} of the batch: {e}") from e
        control = SampleGridControl(grids, t_start, config.control.max_num_steps, on_failure, context, tab,
                                    record)
    control.outputs = SampleOutputs(y0, t_eval, tab, config.interp, rhs, direction, stepper.carry, t_host)
    control.outputs.on_step = on_step
    control.outputs.inside = None if stepper.jumps is None else stepper.inside
    if not isinstance(control, SampleReplay):
        control.outputs.stop = control.stop
    if not control.done:
        drive(control, stepper, measure, control.outputs)
    if isinstance(control, SampleReplay):
        return SampleResult(control.outputs.ys, torch.zeros(0), torch.zeros(0))
    # from_numpy: the finished control's arrays are not written again.
    return SampleResult(control.outputs.ys, torch.from_numpy(control.sample_steps),
                        torch.from_numpy(control.status), control.steps, control.rejected, control.record)
