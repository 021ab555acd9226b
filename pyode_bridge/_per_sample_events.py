"""Per-sample events (issue 18): ``odeint_event`` with each batch row its own event time.

Every row steps on its own (:func:`~pyode_bridge.solvers.per_sample.integrate_per_sample`) and
each accepted step of each row is screened for the row's first zero of ``event_fn`` by the joint
search's own generators (:func:`~pyode_bridge.events.first_zero_search`: the look at the step's
middle, the samples, the dips, the root bracketed to adjacent float64 times), one per row, driven
in lockstep: each round evaluates every row's dense output at the time its search asks for and
``event_fn`` once on the whole batch (:class:`_RowWatch`). A row that has found its event stops
stepping; the solve runs over horizons that double (1, 2, 4, ... times each row's ``|t[b, 1] -
t[b, 0]|``) until every row has found its event or failed.

Gradients: the implicit function theorem row by row, ``dt_e/dp = -(dg/dy . dY/dp + dg/dp) /
(dg/dt + dg/dy . f)`` with ``Y`` each row's state at its (fixed) event time; ``dY/dp`` through the
search (``backprop``) or from a per-sample re-solve from each row's ``t0`` to its detached event
time with the chosen gradient method.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ._per_sample import Setup, _Rows, _StartTime, setup, solve_per_sample
from ._state import State, add_note, find_parameters, unique_tensors
from .errors import SolverError
from .events import _FIXED_CHUNK_STEPS, _NO_SECOND_ORDER, _TANGENTIAL_ROUNDOFF, Search, first_zero_search
from .sensitivity._function import first_order_only
from .solvers.per_sample import (
    SAMPLE_MAX_STEPS,
    SAMPLE_NONFINITE,
    SAMPLE_OK,
    SAMPLE_UNDERFLOW,
    SampleOutputs,
    SampleStep,
    integrate_per_sample,
)
from .stats import SolveStats

__all__ = ["odeint_event_per_sample"]

# A row's dense output: the accepted step holding its times, and that step's extra evaluations.
Holder = tuple[SampleStep, list]


class _RowEvents:
    """``event_fn`` on row states: ``values(t (B,), y (B, n)) -> (B, K)`` checked, each row's
    components' signs at its start, and ``G``: per row ``min_k sign_k c_k``, positive until one
    of its components reaches zero."""

    def __init__(self, event_fn: Callable[..., Tensor], rhs: _Rows) -> None:
        self.event_fn, self.rhs, self.B = event_fn, rhs, rhs.batch
        self.signs = torch.empty(0)

    def values(self, t: Tensor, y: Tensor) -> Tensor:
        """All components ``(B, K)`` at each row's time ``t`` ``(B,)`` and state ``y`` ``(B, n)``;
        differentiable in ``y`` and ``t``."""
        tt = t.to(self.rhs.time_dtype)
        try:
            out = self.event_fn(tt, self.rhs.state(y))
        except Exception as e:
            add_note(e, f"raised by event_fn at the rows' times t[:4]={tt.detach()[:4].tolist()}")
            raise
        B = self.B
        if not isinstance(out, Tensor):
            raise ValueError(f"event_fn returned {type(out).__name__}; in per-sample mode it must return a "
                             f"tensor of shape (B,) or (B, K...) with B={B} (row b: sample b's event "
                             "function), e.g. return y[:, 0] - 1.0")
        if out.is_complex() or not out.is_floating_point():
            raise ValueError(f"event_fn returned dtype {out.dtype}; return a real floating tensor (compute it "
                             "from y, or cast with .to(y.dtype))")
        if out.dim() == 0 or out.shape[0] != B or out.numel() == 0:
            raise ValueError(f"event_fn returned shape {tuple(out.shape)}; in per-sample mode it must return "
                             f"shape (B,) or (B, K...) with B={B}, row b holding sample b's event function(s) "
                             "(e.g. y[:, 0] - 1.0 for y of shape (B, D), not a sum or mean over the batch)")
        return out.reshape(B, -1)

    def start(self, t: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Record each row's components' signs at its start; returns ``G`` ``(B,)`` and the
        components ``(B, K)`` there."""
        with torch.no_grad():
            c = self.values(t, y.detach())
        bad = (~torch.isfinite(c).all(1)).nonzero()[:, 0].tolist()
        if bad:
            raise ValueError(f"event_fn is NaN/Inf at the start of row(s) {bad[:8]} (row {bad[0]}: "
                             f"{c[bad[0]].tolist()[:8]}); it must be finite on the trajectory")
        self.signs = torch.sign(c)
        return (self.signs * c).amin(1).cpu().numpy(), c.cpu().numpy()

    def G(self, t: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``G`` ``(B,)`` and whether each row's components are all finite, at ``(t, y)``."""
        with torch.no_grad():
            c = self.values(t, y.detach())
            return (self.signs * c).amin(1).cpu().numpy(), torch.isfinite(c).all(1).cpu().numpy()

    def crossed(self, t: Tensor, y: Tensor) -> np.ndarray:
        """Each row's component that has reached zero at ``(t, y)`` (the smallest ``sign_k c_k``)."""
        with torch.no_grad():
            return (self.signs * self.values(t, y.detach())).argmin(1).cpu().numpy()


class _RowWatch:
    """The ``on_step`` callback of the per-sample event search (one instance over all horizons):
    screens every accepted step of every row still searching with the joint search's generators
    (:func:`~pyode_bridge.events.first_zero_search`), all rows in lockstep, and returns the rows
    that end at this step (event found, or failed: NaN/Inf ``event_fn``, ``max_num_steps``)."""

    def __init__(self, ev: _RowEvents, t0: np.ndarray, g0: np.ndarray, c0: np.ndarray, cap: int, eps: float,
                 grad: bool) -> None:
        B = len(t0)
        self.ev, self.cap, self.eps, self.grad = ev, cap, eps, grad
        self.g_prev = g0.copy()
        self.steps = np.zeros(B, dtype=np.int64)  # accepted steps, over all horizons
        self.hs = np.zeros((B, 2))  # each row's last two accepted |h|
        self.prev: list[tuple[SampleStep, list, tuple[float, float]] | None] = [None] * B
        self.status = np.zeros(B, dtype=np.int64)
        self.failed = np.zeros(B, dtype=bool)
        self.found = g0 <= 0.0  # a component exactly zero at t0: the event is there (as torchdiffeq)
        self.at_start = self.found.copy()
        self.te = np.where(self.found, t0, np.nan)
        self.touch = np.zeros(B, dtype=bool)
        # The component that is zero at t0 (sign 0, so the smallest |c|: the joint search's ``crossed``):
        # the implicit-function gradient of an event at t0 differentiates that component, not the first.
        self.k = np.where(self.found, np.abs(c0).argmin(1), 0)
        self.slope = np.full(B, np.nan)  # the crossing component's mean rate over its step
        self.rates: dict[int, np.ndarray] = {}  # found this step: every component's mean rate (K,)
        self.far: dict[int, float] = {}  # found this step: the bracket's far end (tb)
        self.parts: list[tuple[Tensor, Tensor]] = []  # (rows, their states at te): the event states
        self.outputs: SampleOutputs | None = None
        self.t0_host, self.forward = t0, np.ones(B, dtype=bool)
        self.c_now = c0.copy()  # (B, K): each row's components at its current time
        self.c_before = c0.copy()  # (B, K): at the start of its last accepted step

    def pending(self) -> np.ndarray:
        return ~(self.found | self.failed)

    def fail(self, rows: np.ndarray, code: int | np.ndarray) -> None:
        rows = rows & self.pending()
        self.status = np.where(rows, code, self.status)
        self.failed |= rows
        for b in rows.nonzero()[0].tolist():
            self.prev[b] = None  # keep no step of a row that has ended

    def __call__(self, outputs: SampleOutputs, step: SampleStep, extra: list) -> np.ndarray | None:
        assert step.moved is not None  # judged
        self.outputs = outputs
        moved = step.moved.cpu().numpy() & self.pending()
        if not moved.any():
            return None
        h = (step.t1 - step.t0).cpu().numpy()
        self.steps += moved
        self.hs = np.where(moved[:, None], np.stack([self.hs[:, 1], np.abs(h)], 1), self.hs)
        t0, t1 = step.t0.cpu().numpy(), step.t1.cpu().numpy()
        self.t0_host, self.forward = t0, h > 0  # this step's, on the host (read per row)
        with torch.no_grad():
            c1_t = self.ev.values(torch.where(step.moved, step.t1, step.t0), step.y_new.detach())
        c1 = c1_t.cpu().numpy().copy()
        g1 = (self.ev.signs.cpu().numpy() * c1).min(1)
        nonfinite = moved & ~np.isfinite(c1).all(1)
        self.fail(nonfinite, SAMPLE_NONFINITE)
        rows = (moved & ~nonfinite).nonzero()[0].tolist()
        last: dict[int, tuple[float, float]] = {}
        searches = {b: first_zero_search(float(t0[b]), float(self.g_prev[b]), float(t1[b]), float(g1[b]),
                                         eps=self.eps, before=p[2] if (p := self.prev[b]) is not None else None,
                                         reuse_coarse=True)
                    for b in rows}
        results = self._run(searches, step, extra, last)
        hit = np.zeros_like(moved)
        for b, bracket in results.items():
            if bracket is None:
                self.g_prev[b] = g1[b]
                self.prev[b] = (step, extra, last[b]) if b in last else None
                self.c_before[b], self.c_now[b] = self.c_now[b], c1[b]
                if self.steps[b] >= self.cap:
                    self.fail(np.arange(len(moved)) == b, SAMPLE_MAX_STEPS)
                continue
            ta, tb, touch = bracket
            hit[b], self.te[b], self.touch[b] = True, ta, touch
            self.rates[b], self.far[b] = self._rates(b, ta, t0[b], h[b], c1[b]), tb
        if hit.any():
            self._record(hit, step, extra)
        return hit | nonfinite | (self.failed & moved)

    def _rates(self, b: int, ta: float, t0: float, h: float, c1: np.ndarray) -> np.ndarray:
        """Row ``b``'s components' mean rates ``(K,)`` over the step holding ``ta``: this step, or the
        row's previous one (the crossing component's is the tangency test's yardstick)."""
        p = self.prev[b]
        if p is not None and ((ta < t0) if h > 0 else (ta > t0)):
            return (self.c_now[b] - self.c_before[b]) / float(p[0].t1[b] - p[0].t0[b])
        return (c1 - self.c_now[b]) / h

    def _holder(self, b: int, s: float, step: SampleStep, extra: list) -> Holder:
        """The step of row ``b`` holding time ``s``: this one, or the row's previous one (a dip across
        their border)."""
        p = self.prev[b]
        if p is not None and (s < self.t0_host[b] if self.forward[b] else s > self.t0_host[b]):
            return p[0], p[1]
        return step, extra

    def _states(self, times: dict[int, float], step: SampleStep, extra: list) -> tuple[Tensor, Tensor]:
        """Every row's time ``(B,)`` float64 and state ``(B, n)``: row ``b`` in ``times`` on its own
        dense output at ``times[b]``, the others where they are (their event_fn values unused)."""
        assert step.moved is not None and self.outputs is not None
        t = torch.where(step.moved, step.t1, step.t0).clone()
        y = step.y_new
        groups: dict[int, tuple[Holder, list[int]]] = {}
        for b, s in times.items():
            holder = self._holder(b, s, step, extra)
            groups.setdefault(id(holder[0]), (holder, []))[1].append(b)
        idx_all, vals = [], []
        for (st, ex), rows in groups.values():
            idx = torch.as_tensor(rows, device=t.device)
            tj = torch.as_tensor([times[b] for b in rows], dtype=torch.float64, device=t.device)
            t[idx] = tj
            idx_all.append(idx)
            vals.append(self.outputs.value(st, idx, tj, ex))
        if idx_all:
            y = y.index_put((torch.cat(idx_all),), torch.cat(vals).to(y.dtype))
        return t, y

    def _run(self, searches: dict[int, Search], step: SampleStep, extra: list,
             last: dict[int, tuple[float, float]]) -> dict[int, Any]:
        """Run every row's search in lockstep: each round, every row's requested times, one batched
        evaluation of the dense outputs and of ``event_fn`` per requested time. ``last``: each row's
        last screened ``(t, G)`` (the next step's ``before``). A row whose ``event_fn`` turns NaN/Inf
        fails."""
        results: dict[int, Any] = {}
        pending: dict[int, tuple[str, list[float]]] = {}

        def advance(b: int, reply: list[float] | None) -> None:
            try:
                pending[b] = searches[b].send(reply)
            except StopIteration as done:
                results[b] = done.value

        for b in searches:
            advance(b, None)
        with torch.no_grad():  # the dense steps' extra evaluations were made in emit, with their graph
            while pending:
                got: dict[int, list[float]] = {b: [] for b in pending}
                bad: set[int] = set()
                for j in range(max(len(ts) for _, ts in pending.values())):
                    times = {b: ts[j] for b, (_, ts) in pending.items() if j < len(ts)}
                    g, finite = self.ev.G(*self._states(times, step, extra))
                    for b in times:
                        got[b].append(float(g[b]))
                        if not finite[b]:
                            bad.add(b)
                for b, (kind, ts) in list(pending.items()):
                    del pending[b]
                    if b in bad:
                        self.fail(np.arange(len(self.status)) == b, SAMPLE_NONFINITE)
                        continue
                    if kind != "point":
                        last[b] = (ts[-1], got[b][-1])
                    advance(b, got[b])
        return results

    def _record(self, hit: np.ndarray, step: SampleStep, extra: list) -> None:
        """The rows ``hit`` found their event in this step: their crossing component (at the
        bracket's far end) and their states at the event time (on their dense output, in the
        search's grad mode: the backprop gradient flows through them)."""
        rows = hit.nonzero()[0].tolist()
        with torch.no_grad():
            k = self.ev.crossed(*self._states({b: self.far[b] for b in rows}, step, extra))
        for b in rows:
            self.k[b] = k[b]
            self.slope[b] = self.rates[b][k[b]]
        self.rates, self.far = {}, {}
        with torch.set_grad_enabled(self.grad):
            _, y_e = self._states({b: float(self.te[b]) for b in rows}, step, extra)
        idx = torch.as_tensor(rows, device=y_e.device)
        self.parts.append((idx, y_e[idx]))
        self.found |= hit
        for b in rows:
            self.prev[b] = None  # keep no step of a row that has ended


def _search(problem: Setup, y0: Tensor, ev: _RowEvents) -> _RowWatch:
    """Step every row from its start until its event (or its failure) over horizons that double
    (fixed steps: chunks of ``_FIXED_CHUNK_STEPS`` steps, doubling, each row on its grid ``t0 + k h``
    as in joint mode); returns the watch holding each row's event (time, component, state) and
    status."""
    config, rhs, stats = problem.config, problem.rhs, problem.stats
    cap = config.control.max_num_steps
    ends = problem.t_rows.cpu().numpy()
    t_start = ends[:, 0].copy()
    direction = 1.0 if bool((ends[:, 1] > ends[:, 0]).all()) else -1.0
    span = np.abs(ends[:, 1] - ends[:, 0])
    g0, c0 = ev.start(problem.t_rows[:, 0], y0)
    watch = _RowWatch(ev, t_start, g0, c0, cap, torch.finfo(y0.dtype).eps, torch.is_grad_enabled())
    a, ya, first, chunk = t_start, y0, None, _FIXED_CHUNK_STEPS
    step_size = None if config.adaptive else config.time.step_size
    splits = rhs.sizes if problem.spec.is_tuple else None
    while watch.pending().any():
        pending = watch.pending()
        with np.errstate(over="ignore"):  # reaches inf (never an error) if no event ever comes
            if step_size is None:
                b = np.where(pending, a + direction * span, a)
                span = span * 2.0
            else:
                b = np.where(pending, a + direction * np.minimum(cap - watch.steps, chunk) * step_size, a)
                chunk *= 2
        watch.fail(pending & ~np.isfinite(b), SAMPLE_MAX_STEPS)
        b = np.where(np.isfinite(b), b, a)
        if not watch.pending().any():
            break
        res = integrate_per_sample(rhs, ya, torch.as_tensor(np.stack([a, b], 1), device=y0.device), config,
                                   splits=splits, on_failure="mask", context="forward solve (event search)",
                                   on_step=watch, stops=problem.stops, time_dtype=rhs.time_dtype,
                                   first_steps=first)
        stats.steps_forward += res.steps
        stats.steps_rejected += res.rejected
        status = res.sample_status.numpy()
        watch.fail(status != SAMPLE_OK, status)
        go_on = torch.as_tensor(watch.pending(), device=y0.device).unsqueeze(1)
        ya = torch.where(go_on, res.ys[-1], ya)  # the others stay finite: func still sees every row
        a = b
        # Continue with the steps reached rather than a fresh initial-step estimate (as joint).
        first = watch.hs.max(1)
    return watch


_REASONS = {SAMPLE_NONFINITE: "func, the state or event_fn became NaN/Inf",
            SAMPLE_UNDERFLOW: "step size underflow (the row may blow up in finite time, or be too stiff for an "
                              "explicit method)",
            SAMPLE_MAX_STEPS: "no event within max_num_steps={cap} steps: event_fn kept the sign it had at the "
                              "row's start; check that it changes sign after t0 in this direction of time "
                              "(reverse_time=True, or a decreasing t, integrates backwards), or raise "
                              "options={{'max_num_steps': ...}}"}


def _raise_failed(watch: _RowWatch, cap: int, method: str) -> None:
    """``on_failure="raise"``: a SolverError naming the failed rows and why."""
    rows = watch.failed.nonzero()[0].tolist()
    b = rows[0]
    why = _REASONS[int(watch.status[b])].format(cap=cap)
    raise SolverError(f"event search with method '{method}' (per sample): row(s) {rows[:8]}"
                      f"{' ...' if len(rows) > 8 else ''} of the batch failed (row {b}: {why}). "
                      "options={'on_failure': 'mask'} gives those rows NaN event times and states and the "
                      "others their events (stats.sample_status says why each failed).")


class _RowEventOutputs(torch.autograd.Function):
    """Identity on ``(t_e (B,), y_e (B, n))`` whose backward raises ``message`` where a gradient
    reaches a row of ``bad`` (a tangential event: no gradient exists), and otherwise refuses to be
    differentiated again (the implicit gradient is first order only)."""

    @staticmethod
    def forward(ctx: Any, bad: Tensor, message: str, t_pre: Tensor, y_pre: Tensor) -> tuple[Tensor, Tensor]:
        ctx.message = message
        ctx.save_for_backward(bad, t_pre, y_pre)
        return t_pre.clone(), y_pre.clone()

    @staticmethod
    def backward(ctx: Any, grad_t: Tensor, grad_y: Tensor) -> tuple:
        bad, *saved = ctx.saved_tensors
        if bool(bad.any()):
            reached = bad & ((grad_t != 0) | (grad_y != 0).any(1))
            if bool(reached.any()):
                rows = reached.nonzero()[:, 0].tolist()
                raise SolverError(f"row(s) {rows[:8]} of the batch: {ctx.message}")
        if torch.is_grad_enabled():
            grad_t, grad_y = first_order_only(_NO_SECOND_ORDER, [grad_t, grad_y], [grad_t, grad_y, *saved])
        return None, None, grad_t, grad_y


def _implicit_gradient(ev: _RowEvents, rhs: _Rows, te: Tensor, t_dtype: torch.dtype, Y: Tensor, k: Tensor,
                       slope: np.ndarray, touch: np.ndarray, valid: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(t_e (B,), y_e (B, n))`` with the implicit-function gradient attached row by row (values
    unchanged): ``t_e - (g - g.detach()) / D`` and ``Y + f (t_e' - t_e)`` with ``g`` each row's
    crossing component at ``(t_e, Y)`` (carrying ``dg/dY . dY/dp + dg/dp``) and ``D = dg/dt + dg/dy
    . f`` per row. A row whose ``D`` is lost in round-off or tiny against ``slope`` (a tangential
    crossing), or whose event is a touch, has no gradient: the backward raises naming it, if a
    gradient reaches it. ``valid``: the rows with an event (the others' gradients are not used).
    ``te``: float64; the times returned are in ``t_dtype``."""
    te64, te_t = te.to(torch.float64), te.to(t_dtype)
    kk = k.unsqueeze(1)
    g_live = ev.values(te64, Y).gather(1, kk)[:, 0]
    if not (g_live.requires_grad or Y.requires_grad):
        return te_t, Y
    with torch.enable_grad():
        tt = te64.to(rhs.time_dtype).detach().requires_grad_(True)
        yy = Y.detach().requires_grad_(True)
        c = ev.values(tt, yy).gather(1, kk)[:, 0]
        g_t = g_y = None
        if c.requires_grad:
            g_t, g_y = torch.autograd.grad(c.sum(), (tt, yy), allow_unused=True)
    with torch.no_grad():
        f_e = rhs(te64, Y.detach())
        g_t = torch.zeros_like(te64) if g_t is None else g_t.to(torch.float64)
        g_y = torch.zeros_like(Y) if g_y is None else g_y
        D = g_t + (g_y * f_e).sum(1).to(torch.float64)
        scale = g_t.abs() + (torch.linalg.vector_norm(g_y, dim=1) * torch.linalg.vector_norm(f_e, dim=1)).double()
        d, scale_h = D.cpu().numpy(), scale.cpu().numpy()
    eps = torch.finfo(Y.dtype).eps
    with np.errstate(invalid="ignore"):
        tangential = (~np.isfinite(d) | (scale_h == 0.0) | (np.abs(d) <= _TANGENTIAL_ROUNDOFF * eps * scale_h)
                      | (np.abs(d) <= math.sqrt(eps) * np.abs(np.nan_to_num(slope, nan=0.0))))
    bad = valid & (touch | tangential)
    message = ""
    if bad.any():
        b = int(bad.nonzero()[0][0])
        if touch[b]:
            message = (f"the event at t={float(te64[b]):.6g} (row {b}) is tangential: event_fn touches zero "
                       "there (to round-off) without changing sign, so the event time has no gradient (a small "
                       "change of the inputs can make the event vanish).")
        else:
            message = (f"the event at t={float(te64[b]):.6g} (row {b}) is tangential: d/dt event_fn(t, y(t)) = "
                       f"{d[b]:.3g} there (|dg/dt| + |dg/dy| |f| = {scale_h[b]:.3g}), so the event time has "
                       "no gradient: the implicit function theorem divides by this derivative.")
        message += (" Use an event_fn that crosses zero transversally (e.g. y - c rather than (y - c)**3), or "
                    "compute the events under torch.no_grad() (or with detached inputs) if you need no gradient.")
    keep = torch.as_tensor(bad | ~valid, device=D.device)
    D = torch.where(keep, torch.ones_like(D), D)  # finite values; the backward raises for a bad row
    t_pre = te_t - (g_live - g_live.detach()).to(t_dtype) / D.to(t_dtype)
    y_pre = Y + f_e * (t_pre - te_t).to(Y.dtype).unsqueeze(1)
    t_out, y_out = _RowEventOutputs.apply(torch.as_tensor(bad, device=D.device), message, t_pre, y_pre)
    return t_out, y_out


def _resolve_gradient(func: Callable[..., Any], y0: State, rhs: _Rows, t0: Tensor, te: np.ndarray,
                      stats: SolveStats, **kwargs: Any) -> Tensor:
    """``Y - Y.detach()`` ``(B, n)``: zero, carrying ``dY/dp`` of a per-sample solve from each row's
    ``t0`` to its fixed ``te`` with the chosen gradient method (``stats``: its counters)."""
    t2 = torch.stack([t0.to(torch.float64), torch.as_tensor(te, device=t0.device)], 1)
    ys = solve_per_sample(func, y0, t2, stats=stats, **kwargs)
    Y = rhs.rows(tuple(p[1] for p in ys) if isinstance(ys, tuple) else ys[1])
    return Y - Y.detach()


def odeint_event_per_sample(func: Callable[..., Any], y0: State, t: Tensor | Sequence[float], *,
                            event_fn: Callable[..., Tensor], rtol: float, atol: float, method: Any,
                            options: dict[str, Any] | None, sensitivity: Any, stats: SolveStats | None,
                            backend: str, adjoint_params: Iterable[Tensor] | None,
                            adjoint_rtol: float | None = None, adjoint_atol: float | None = None
                            ) -> tuple[Tensor, State]:
    """``odeint(func, y0, t, event_fn=...)`` in per-sample mode (``t`` ``(B, 2)``, or ``(2,)`` with
    ``options["step_control"] = "per_sample"``): each row ``b`` solved from ``t[b, 0]`` until its
    own event (``t[b, 1]`` only sets the direction). Returns ``(event_t (B,), solution (2, B, ...))``
    (``solution[1, b]``: row ``b``'s state at its event; NaN for a failed row under
    ``on_failure="mask"``, with its event time)."""
    if not callable(event_fn):
        raise ValueError(f"event_fn must be a callable event_fn(t, y) -> Tensor, got {type(event_fn).__name__}")
    problem = setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, sensitivity=sensitivity,
                    stats=stats, backend=backend)
    config, rhs, B = problem.config, problem.rhs, problem.B
    if problem.t_rows.shape[1] != 2:
        raise ValueError(f"with event_fn, t must hold exactly 2 times per row ((B, 2): t[b, 0] row b's start, "
                         f"t[b, 1] only the direction), got {problem.t_rows.shape[1]}; or call "
                         "pyode_bridge.odeint_event(func, y0, t0, event_fn=...) with t0 of shape (B,)")
    if not config.adaptive and (config.time.grid is not None or config.time.step_size is None):
        raise ValueError(f"event handling with the fixed-step method {config.method.name!r} needs "
                         "options={'step_size': h} (each row steps t0[b] + k h until its event; a grid or "
                         "the times t cannot be used), as in joint mode")
    t_tensor = t if isinstance(t, Tensor) else None
    t_dtype = t_tensor.dtype if t_tensor is not None else problem.spec.dtype
    grad_on = torch.is_grad_enabled()
    t0_live = None
    if grad_on and t_tensor is not None and t_tensor.requires_grad:
        t0_live = t_tensor[:, 0] if t_tensor.dim() == 2 else t_tensor[0].expand(B)
    y_rows = rhs.rows(y0)
    y_start = _StartTime.apply(rhs, y_rows, t0_live) if t0_live is not None else y_rows
    through_search = grad_on and problem.strategy.per_sample == "autograd"
    ev = _RowEvents(event_fn, rhs)
    with torch.set_grad_enabled(through_search):
        watch = _search(problem, y_start if through_search else y_rows.detach(), ev)
    if watch.failed.any() and problem.on_failure == "raise":
        _raise_failed(watch, config.control.max_num_steps, config.method.name)
    stats = problem.stats
    searched = (stats.steps_forward, stats.steps_rejected)  # a re-solve resets stats
    valid, device = ~watch.failed, y_rows.device
    Y = y_start if through_search else y_rows.detach()
    for idx, vals in watch.parts:
        Y = Y.index_put((idx,), vals.to(Y.dtype))
    parts = y0 if isinstance(y0, (tuple, list)) else (y0,)
    params = unique_tensors(adjoint_params if adjoint_params is not None else find_parameters(func))
    resolve = grad_on and not through_search and (t0_live is not None or any(
        isinstance(p, Tensor) and p.requires_grad for p in [*parts, *params]))
    re_nfe = 0
    if resolve:
        in_steps = valid & ~watch.at_start
        t_start = problem.t_rows[:, 0]
        direction = math.copysign(math.inf, float(problem.t_rows[0, 1] - problem.t_rows[0, 0]))
        # A row without an event in a step (at t0, or failed) is re-solved over one float: its span
        # must not be empty, and its state is y0 anyway.
        te_re = np.where(in_steps, watch.te, np.nextafter(t_start.cpu().numpy(), direction))
        opts = {**(options or {}), "step_control": "per_sample", "on_failure": "mask"}
        dY = _resolve_gradient(func, y0, rhs, t0_live if t0_live is not None else t_start, te_re, stats,
                               rtol=rtol, atol=atol, method=method, options=opts, sensitivity=sensitivity,
                               backend=backend, adjoint_params=adjoint_params, adjoint_rtol=adjoint_rtol,
                               adjoint_atol=adjoint_atol)
        re_nfe = stats.nfe_forward
        stats.steps_forward += searched[0]
        stats.steps_rejected += searched[1]
        Y = torch.where(torch.as_tensor(in_steps, device=device).unsqueeze(1), Y.detach() + dY, y_start)
    te = torch.as_tensor(np.where(valid, watch.te, problem.t_rows[:, 0].cpu().numpy()), device=device)
    t_out, y_out = te.to(t_dtype), Y
    if grad_on:
        t_out, y_out = _implicit_gradient(ev, rhs, te, t_dtype, Y,
                                          torch.as_tensor(watch.k, device=device), watch.slope, watch.touch, valid)
    failed = torch.as_tensor(watch.failed, device=device)
    t_out = torch.where(failed, torch.full_like(t_out, math.nan), t_out)
    y_out = torch.where(failed.unsqueeze(1), torch.full_like(y_out, math.nan), y_out)
    stats.nfe_forward = rhs.nfe + re_nfe
    stats.sample_steps = torch.as_tensor(watch.steps)
    stats.sample_status = torch.as_tensor(watch.status)
    return t_out, rhs.trajectory(torch.stack([y_rows, y_out.to(y_rows.dtype)]))
