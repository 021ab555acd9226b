"""Per-sample solving's front door (issue 18): a 2-D ``t`` ``(B, T)`` or
``options={"step_control": "per_sample"}`` solves every batch row with its own times, step size,
error test and failure (:mod:`~pyode_bridge.solvers.per_sample`), ``func`` seeing ``t`` of shape
``(B,)``. Gradients: ``backprop``, ``checkpointed`` (a bit-for-bit replay of the recorded steps),
and the adjoints ``backsolve``, ``interpolating`` and ``interpolated`` (every row's adjoint solved
backwards with its own steps); ``dL/dt`` per row."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ._state import State, StateSpec, find_parameters, unique_tensors
from ._time_grad import _NO_SECOND_ORDER
from ._validate import (
    _batch_size,
    check_params,
    check_per_sample_func,
    check_sample_stops,
    check_sample_times,
    check_state,
    check_time,
    make_config,
    per_sample_options,
)
from .backends.base import get_backend
from .sensitivity import SENSITIVITIES, resolve_sensitivity
from .sensitivity._function import first_order_only
from .sensitivity.base import guard_alarm
from .sensitivity.bli import barycentric_weights, chebyshev_points
from .sensitivity.interpolated import _N_CHECKS, _spread
from .solvers import SolverConfig
from .solvers.loop import stage_rows
from .solvers.per_sample import SampleOutputs, SampleResult, SampleStep, integrate_per_sample
from .solvers.tableau import ButcherTableau
from .stats import SolveStats

__all__ = ["requested", "setup", "Setup", "solve_per_sample"]


def _first_order(name: str) -> str:
    """The error of differentiating a per-sample gradient ``name`` computed without a graph again."""
    return (f"sensitivity='{name}' (per sample) computes first derivatives only: its gradient cannot be "
            "differentiated again (create_graph=True, gradgradcheck, Hessians). Use sensitivity='backprop', "
            "which differentiates through the solver's operations.")

#: The gradient methods per-sample mode runs, and those it refuses (with the alternatives named).


def requested(t: Any, options: Any) -> bool:
    """Whether ``odeint(..., t, options=options)`` asks for per-sample control (a 2-D ``t`` of at
    least two times per row, or ``options["step_control"] == "per_sample"``). A column ``(T, 1)``
    is the common slip of a 1-D ``t``: it gets the 1-D check's fix (``t.reshape(-1)``)."""
    return ((isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] > 1)
            or (isinstance(options, Mapping) and options.get("step_control") == "per_sample"))


class _Rows:
    """``func`` on row states: ``rhs(t (B,) float64, y (B, n)) -> (B, n)``, ``func`` seeing ``t`` of
    shape ``(B,)`` in ``time_dtype`` and ``y`` in ``y0``'s structure; counts its evaluations.

    ``keep_nan_out`` (``on_failure="mask"``): while a graph is recorded, a row whose stage state is
    NaN/Inf gets ``func`` of its initial state (where ``func`` was finite; 0 could divide by 0) and
    a NaN result instead. A failing row's NaN stages stay
    in the graph of its rejected attempts with a zero cotangent, and ``0 * NaN`` in ``func``'s
    parameter gradients would make every row's NaN."""

    def __init__(self, func: Callable[..., Any], spec: StateSpec, time_dtype: torch.dtype, batch: int,
                 keep_nan_out: bool = False) -> None:
        self.func, self.spec, self.time_dtype, self.batch, self.nfe = func, spec, time_dtype, batch, 0
        self.sizes = [n // batch for n in spec.numels]
        self.keep_nan_out = keep_nan_out
        self.initial: Tensor | None = None  # the rows func is first evaluated at (keep_nan_out's stand-in)

    def state(self, y: Tensor) -> State:
        """``(B, n)`` -> ``y0``'s structure."""
        if not self.spec.is_tuple:
            # Reshaped even where y0 is (B, n) already: without the view node autograd accumulates
            # y's gradient in another order (the last bit of the parameter gradients changes).
            return y.reshape(self.spec.shapes[0])
        return tuple(p.reshape(s) for p, s in zip(y.split(self.sizes, 1), self.spec.shapes))

    def rows(self, y: State) -> Tensor:
        """``y0``'s structure -> ``(B, n)``."""
        parts = y if isinstance(y, (tuple, list)) else (y,)
        if len(parts) > 1:
            return torch.cat([p.reshape(self.batch, -1) for p in parts], 1)
        out = parts[0]
        # func's (B, n) result is its own row form: no view node per evaluation (a pass-through
        # at the end of func's graph, whose gradients are summed in the same order without it).
        return out if out.dim() == 2 and out.shape[0] == self.batch else out.reshape(self.batch, -1)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        bad = None
        if self.initial is None:
            self.initial = y.detach()
        if self.keep_nan_out and torch.is_grad_enabled():  # no sync: finite rows pass bit for bit
            bad = ~torch.isfinite(y).all(1, keepdim=True)
            y = torch.where(bad, self.initial, y)
        t_func, state = t if t.dtype == self.time_dtype else t.to(self.time_dtype), self.state(y)
        if self.nfe == 1:  # func written for a 0-d t: a ValueError naming the fix, not a broadcast
            out = self.rows(check_per_sample_func(self.func, state, t_func))
        else:
            out = self.rows(self.func(t_func, state))
        return out if bad is None else out.masked_fill(bad, math.nan)

    def trajectory(self, ys: Tensor) -> State:
        """``(T, B, n)`` -> ``(T, *shape)`` or a tuple of such."""
        T = ys.shape[0]
        if not self.spec.is_tuple:
            return ys.reshape(T, *self.spec.shapes[0])
        return tuple(p.reshape(T, *s) for p, s in zip(ys.split(self.sizes, 2), self.spec.shapes))


class _Checkpointed(torch.autograd.Function):
    """The forward solve without a graph, recording each row's steps; the backward replays them with
    a graph (bit for bit the backprop solve) and differentiates the replay."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., SampleResult], out: list, y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():  # detached: a view of a grad-requiring y0 would look differentiable to func
            res = run(y0.detach(), record=True)
        out.append(res)
        ctx.run, ctx.record = run, res.record
        ctx.save_for_backward(y0, *params)
        return res.ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple:
        y0, *params = ctx.saved_tensors
        second_order = torch.is_grad_enabled()  # backward(create_graph=True)
        with torch.enable_grad():
            y = y0.detach().requires_grad_(True)
            ys = ctx.run(y, replay=ctx.record).ys
            wrt = [y, *params]
            grads = list(torch.autograd.grad(ys, wrt, grad_ys.detach(), allow_unused=True))
        if second_order:  # the replay's graph is gone: a second derivative would be silently zero
            grads = first_order_only(_first_order("checkpointed"), grads, [grad_ys, y0, *params])
        return (None, None, *grads)


class _Adjoint(torch.autograd.Function):
    """The forward solve without a graph (``run``: the solve, keeping what its ``sweep`` needs);
    the backward is ``sweep``, the adjoint sweep of :func:`_adjoint_sweep` (backsolve's, or an
    interpolating one's over the forward's record)."""

    @staticmethod
    def forward(ctx: Any, name: str, run: Callable[..., SampleResult], sweep: Callable[..., tuple], out: list,
                y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():  # detached, as in _Checkpointed
            res = run(y0.detach())
        out.append(res)
        ctx.sweep, ctx.name = sweep, name
        ctx.save_for_backward(res.ys, *params)
        return res.ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple:
        ys, *params = ctx.saved_tensors
        second_order = torch.is_grad_enabled()  # backward(create_graph=True)
        with torch.no_grad():  # else create_graph records a part of the sweep: a wrong second derivative
            grad_y0, grad_params = ctx.sweep(ys, grad_ys.detach(), params)
        grads = [grad_y0, *grad_params]
        if second_order:
            grads = first_order_only(_first_order(ctx.name), grads, [grad_ys, ys])
        return (None, None, None, None, *grads)


# ``z_at(k, t (B,) float64) -> z (B, n)``: each row's forward state at its time ``t`` inside its
# output interval ``k`` (from ``t[:, k - 1]`` to ``t[:, k]``).
ZAt = Callable[[int, Tensor], Tensor]


def _adjoint_sweep(rhs: _Rows, t_rows: Tensor, config: SolverConfig, stats: SolveStats, strategy: Any,
                   ys: Tensor, grad_ys: Tensor, params: Sequence[Tensor], z_at: ZAt | None = None,
                   stops: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Tensor, list]:
    """``(dL/dy0 (B, n), [dL/dtheta])`` from the outputs ``ys`` ``(T, B, n)`` and their gradients:
    every row's adjoint ``a`` integrated backwards over its own output intervals with its own steps
    and error test (``a`` jumping by the output's gradient at each output time), and the parameter
    integral ``-int a^T df/dtheta dt`` of the accepted steps summed over the rows (not
    error-controlled, as with ``adjoint_options={"norm": "seminorm"}``).

    ``z_at`` (interpolating, interpolated): the forward state ``z(t)`` the adjoint is evaluated at,
    and only ``a`` is integrated, each part of a tuple state error-controlled on its own. ``None``
    (backsolve): ``(y, a)`` is integrated, ``y`` restarting from the forward's output at each
    output time. Backsolve's guard, per row: where the reverse-solved state ends an interval further
    from the forward's output than ``strategy.max_error`` relative to it (``||dz|| / (||z|| + atol
    sqrt(n))`` over the row), the adjoint and the parameter integrand were evaluated that far off,
    and the row's gradient may be off by about as much; ``strategy.on_instability`` decides (warn,
    raise, ignore). A conservative stand-in for joint backsolve's calibrated estimate
    (``stats.backsolve_error`` stays None). ``stops``: each row's ``(step_t, jump_t)`` ``(B, K)``,
    landed on backwards too."""
    n = ys.shape[2]
    tab = config.method
    assert isinstance(tab, ButcherTableau)  # per-sample mode runs explicit Runge-Kutta tableaux only
    b_row = stage_rows(tab).b
    weights = dict(zip(b_row.idx, b_row.coefs))
    tape: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # id(stage) -> (stage, f, a): graphs kept
    grads = [torch.zeros_like(p) for p in params]
    k_now = [0]  # the output interval being swept (z_at's)

    def augmented(t: Tensor, z: Tensor) -> Tensor:
        y, a = (z[:, :n], z[:, n:]) if z_at is None else (z_at(k_now[0], t), z)
        if some_gone[k_now[0]]:  # finite, or 0 * NaN would reach the parameter gradients
            y = torch.where(gone[k_now[0]].unsqueeze(1), ys[0], y)
        with torch.enable_grad():
            y_in = y.detach().requires_grad_(True)
            f = rhs(t, y_in)
            (vjp,) = torch.autograd.grad(f, y_in, a, retain_graph=bool(params))
        out = torch.cat([f.detach(), -vjp], 1) if z_at is None else -vjp
        if params:
            tape[id(out)] = (out, f, a)
        return out

    def quadrature(step: SampleStep) -> None:
        # The accepted rows' h b_s (-a_s^T df/dtheta at stage s), summed over rows and stages in one
        # backward through the step's kept evaluation graphs.
        assert step.moved is not None  # judged
        w = (step.h * step.moved).to(ys.dtype).unsqueeze(1)
        outs, cots = [], []
        for s, k in enumerate(step.ks):
            if s in weights:
                _, f, a = tape[id(k)]
                outs.append(f)
                cots.append(a * w * -weights[s])
        got = torch.autograd.grad(outs, list(params), cots, allow_unused=True)
        for acc, g in zip(grads, got):
            if g is not None:
                acc.add_(g)
        tape.clear()

    a = grad_ys[-1]
    drift = torch.zeros(ys.shape[1], dtype=ys.dtype, device=ys.device)
    splits = [n, n] if z_at is None else rhs.sizes if rhs.spec.is_tuple else None
    # Rows the forward masked as failed (on_failure="mask") are NaN from their failure on: such a
    # row sits out those intervals (length 0, from its initial state), its a passed on unchanged.
    gone = ~torch.isfinite(ys).all(2)  # (T, B)
    some_gone = gone.any(1).tolist()
    for k in range(ys.shape[0] - 1, 0, -1):
        k_now[0] = k
        pair, y_k = t_rows[:, [k, k - 1]].contiguous(), ys[k]
        if some_gone[k]:
            pair[:, 0] = torch.where(gone[k], pair[:, 1], pair[:, 0])
            y_k = torch.where(gone[k].unsqueeze(1), ys[0], y_k)
        res = integrate_per_sample(augmented, a if z_at is not None else torch.cat([y_k, a], 1), pair, config,
                                   splits=splits, context=f"backward pass ({strategy.name})",
                                   on_accept=quadrature if params else None, stops=stops,
                                   time_dtype=rhs.time_dtype)
        stats.steps_backward += res.steps
        stats.steps_backward_rejected += res.rejected
        a_end = res.ys[-1][:, -n:]
        if some_gone[k]:  # a row that never stepped has no output written
            a_end = torch.where(gone[k].unsqueeze(1), a, a_end)
        a = a_end + grad_ys[k - 1]
        if z_at is None and strategy.on_instability != "ignore":
            off = (torch.linalg.vector_norm(res.ys[-1][:, :n] - ys[k - 1], dim=1)
                   / (torch.linalg.vector_norm(ys[k - 1], dim=1) + config.control.atol * math.sqrt(n)))
            drift = torch.maximum(drift, off.nan_to_num(math.inf).masked_fill(gone[k], 0.0))
    bad = (drift > strategy.max_error).nonzero()[:, 0].tolist() if z_at is None else []
    if bad:
        guard_alarm(strategy.on_instability,
                    f"backward pass (backsolve, per sample): the reverse-solved state of row(s) {_rows(bad)} "
                    f"drifted from the forward's by up to "
                    f"{100 * float(drift.max()):.3g}% (row {int(drift.argmax())}); those rows' gradients may be "
                    "off by about as much. Use sensitivity='checkpointed' (exact), tighten adjoint_rtol/"
                    "adjoint_atol, or add output times (the state restarts from the forward's there)",
                    stacklevel=4)
    return a, grads


def _rows(bad: list[int]) -> str:
    """The first rows of a list, for a guard's message."""
    return f"{bad[:8]}{' ...' if len(bad) > 8 else ''}"


class _DenseRecord:
    """The forward's dense output, row by row (``on_step`` of :func:`integrate_per_sample`): every
    accepted step's times ``(B,)``, which rows moved, its start and end states, first stage and
    the evaluations its continuous extension needs; :meth:`at` reads each row's ``z(t)`` from the
    step of its own that holds ``t`` (the forward's own outputs exactly where ``t`` is one).

    ``watch``: interpolating's guard figure per row (:class:`~pyode_bridge.sensitivity.
    interpolating._DenseOutputWatch`'s, row by row): the dense output's error estimate on each
    step (an adaptive pair's embedded error for its own extension, the embedded quadratics for
    cubic Hermite; ``interp="linear"`` and extensions without one are not measured), relative to the
    row's components (their largest ``|z_i|`` so far), RMS over the row, weighted by the step's
    share of the row's time span."""

    def __init__(self, t_rows: Tensor, atol: float, watch: bool) -> None:
        self.sign = 1.0 if bool((t_rows[:, -1] >= t_rows[:, 0]).all()) else -1.0
        self.span = (t_rows[:, -1] - t_rows[:, 0]).abs()
        self.atol, self.watch = atol, watch
        self.steps: list[tuple] = []
        self.outputs: SampleOutputs | None = None
        self.stacked: list[Tensor] = []
        self.peak: Tensor | None = None
        self.error: Tensor | None = None  # (B,): the time-weighted relative errors, summed

    def __call__(self, outputs: SampleOutputs, step: SampleStep, extra: list) -> None:
        self.outputs = outputs
        assert step.moved is not None  # judged
        self.steps.append((step.t0, step.t1, step.moved, step.y0, step.y_new, step.ks[0], *extra))
        if self.watch:
            self._measure(outputs, step, extra)

    def _measure(self, outputs: SampleOutputs, step: SampleStep, extra: list) -> None:
        assert step.moved is not None  # judged
        h = step.h.to(step.y0.dtype).unsqueeze(1)
        b_err = stage_rows(outputs.tab).b_err
        if outputs.interp == "linear" or (outputs.own_dense and b_err is None):
            return
        if outputs.own_dense:
            assert b_err is not None
            d = (h * sum(c * step.ks[j] for j, c in zip(b_err.idx, b_err.coefs))).abs()
        else:
            d = (2.0 * (step.y_new - step.y0) - h * (step.ks[0] + extra[0])).abs().mul_(4.0 / 27.0)
        scale = torch.maximum(step.y0.abs(), step.y_new.abs())
        self.peak = scale if self.peak is None else torch.maximum(self.peak, scale)
        floor = self.peak.amax(1, keepdim=True) * (1e3 * torch.finfo(scale.dtype).eps) + self.atol
        rms = torch.linalg.vector_norm(d / (self.peak + floor), dim=1) / math.sqrt(d.shape[1])
        part = torch.where(step.moved, rms * step.h.abs().to(rms.dtype), torch.zeros_like(rms))
        self.error = part if self.error is None else self.error + part

    def figures(self) -> Tensor | None:
        """Each row's time-averaged relative dense-output error ``(B,)`` (None if not measured)."""
        return None if self.error is None else self.error / self.span.to(self.error.dtype)

    def at(self, t: Tensor) -> Tensor:
        """Each row's ``z`` at its times ``t`` ``(B, K)`` float64 (inside its solved span): ``(B, K, n)``."""
        if not self.stacked:
            # (N, B) times and moved; (N, B, 3 + E, n) the states and evaluations, gathered in one
            # operation; (N, B) each row's moved steps first, in order.
            starts, ends, moves, *parts = zip(*self.steps)
            moved_t = torch.stack(moves)
            self.stacked = [torch.stack(starts), torch.stack(ends), moved_t,
                            torch.argsort((~moved_t).to(torch.uint8), dim=0, stable=True),
                            torch.stack([torch.stack(v) for v in parts], 2)]
            self.steps = []
        t0, t1, moved, own, states = self.stacked
        B, K = t.shape
        rows = torch.arange(B, device=t.device).unsqueeze(1).expand(B, K)
        # The row's first step of its own that reaches t: after those of its own that end before t
        # (a row's time only grows on the steps it moved).
        before = (moved.unsqueeze(2) & (self.sign * (t1.unsqueeze(2) - t) < 0)).sum(0)
        idx = own[before.clamp_(max=own.shape[0] - 1), rows]
        y0, y1, k0, *extra = states[idx, rows].flatten(0, 1).unbind(1)
        t0_at, t1_at = t0[idx, rows].flatten(), t1[idx, rows].flatten()
        step = SampleStep(t0_at, t1_at, t1_at - t0_at, y0, y1, [k0], None)
        assert self.outputs is not None
        z = self.outputs.value(step, torch.arange(B * K, device=t.device), t.flatten(), extra)
        return z.reshape(B, K, -1)


def _interpolating_guard(record: _DenseRecord, strategy: Any, stats: SolveStats, config: SolverConfig) -> None:
    """Interpolating's guard per row: the rows whose dense output's figure exceeds ``guard_rtol``
    (``stats.dense_output_error``: the largest row's), named under ``on_inaccuracy``."""
    fig = record.figures()
    if fig is None:
        return
    stats.dense_output_error = float(fig.max())
    bad = (~(fig <= strategy.guard_rtol)).nonzero()[:, 0].tolist()  # NaN is bad
    if bad:
        fix = "tighter rtol/atol or a smaller max_step" if config.adaptive else "a smaller step_size"
        guard_alarm(strategy.on_inaccuracy,
                    f"forward solve with method '{config.method.name}' (interpolating, per sample): the dense "
                    f"output of row(s) {_rows(bad)}, from which the backward reads z, misses an independent "
                    f"interpolant of its steps by up to {float(fig.max()):.3g} relative to the state, averaged "
                    f"over time (guard_rtol={strategy.guard_rtol:g}): the steps do not resolve z, and those "
                    f"rows' gradients may be off by more than 1%. Use {fix}, or sensitivity='checkpointed' "
                    "(the exact gradient of the solve).", stacklevel=8)


def _chebyshev(m: int) -> Tensor:
    """:func:`~pyode_bridge.sensitivity.bli.chebyshev_points` on ``[-1, 1]``, float64 ``(m + 1,)``."""
    return torch.tensor(chebyshev_points(m, -1.0, 1.0), dtype=torch.float64)


def _barycentric(values: Tensor, x: Tensor) -> Tensor:
    """Each row's interpolant through ``values`` ``(B, m + 1, n)`` at the Chebyshev points of its
    interval, at ``x`` ``(B, K)`` (its times mapped onto ``[-1, 1]``): ``(B, K, n)``, as
    :class:`~pyode_bridge.sensitivity.bli.BarycentricInterpolant` (second-kind weights; each term
    divided by the smallest ``|x - x_j|``, so that none overflows; a node's value exactly on it)."""
    m = values.shape[1] - 1
    w = torch.tensor(barycentric_weights(m), dtype=torch.float64, device=x.device)
    d = x.clamp(-1.0, 1.0).unsqueeze(-1) - _chebyshev(m).to(x.device)
    hit = d == 0.0
    c = w / (d / d.abs().amin(-1, keepdim=True))
    c = torch.where(hit.any(-1, keepdim=True), hit.to(torch.float64), c / c.sum(-1, keepdim=True))
    return c.to(values.dtype) @ values


def _ratio_rows(approx: Tensor, ref: Tensor, rtol: float, atol: float) -> Tensor:
    """Each row's largest over ``K`` of the RMS error scaled by ``atol + rtol |ref|`` (``(B, K, n)``
    -> ``(B,)``)."""
    scaled = (approx - ref) / ref.abs().mul(rtol).add_(atol)
    return (torch.linalg.vector_norm(scaled, dim=2) / math.sqrt(ref.shape[2])).amax(1)


def _chebyshev_nodes(record: _DenseRecord, breaks: Tensor, strategy: Any, stats: SolveStats,
                     config: SolverConfig, failed: Tensor) -> list[Tensor]:
    """Interpolated's forward, row by row: each row's ``z`` at the Chebyshev points of each of its
    intervals ``breaks[:, i - 1]`` to ``breaks[:, i]`` (``(B, P)``: its output times, or
    :class:`_Breaks`' times with its jumps), read from the forward's dense output,
    ``[(B, m + 1, n)] * (P - 1)``. A row's interval of length 0 reads its one point ``m + 1``
    times (a constant, measured exact). With ``nodes="auto"`` an interval keeps the smallest of 4,
    8, ... ``max_nodes`` points whose interpolant matches the recorded points it does not use
    within the tolerance, in every row (one grid per interval for the batch). The guard, per row:
    the interpolant's error at off-grid points, scaled by the tolerance, above ``guard_factor``
    names the row under ``on_inaccuracy``. ``failed`` ``(B,)``: the rows the forward masked as
    failed, left out of both."""
    ctl = config.control
    n_rec = strategy.max_nodes if strategy.nodes == "auto" else int(strategy.nodes)
    x_rec = _chebyshev(n_rec).to(breaks.device)
    fine = _chebyshev(2 * n_rec).to(breaks.device)
    x_chk = fine[[2 * j + 1 for j in _spread(n_rec, _N_CHECKS)]]
    kept, worst = [], torch.zeros(breaks.shape[0], dtype=torch.float64, device=breaks.device)
    where = torch.zeros_like(worst, dtype=torch.long)
    for k in range(1, breaks.shape[1]):
        a, b = breaks[:, k - 1:k], breaks[:, k:k + 1]
        mid, half = 0.5 * (a + b), 0.5 * (b - a)
        times = mid + half * x_rec
        times[:, 0], times[:, -1] = a[:, 0], b[:, 0]
        v = record.at(times)
        n = 4 if strategy.nodes == "auto" else n_rec
        while n < n_rec:
            stride = n_rec // n
            odd = list(range(stride // 2, n_rec, stride))  # off the sub-grid, on the record
            picks = sorted({odd[i] for i in _spread(len(odd), _N_CHECKS)})
            err = _ratio_rows(_barycentric(v[:, ::stride], x_rec[picks].expand(v.shape[0], -1)), v[:, picks],
                              ctl.rtol, ctl.atol).masked_fill(failed, 0.0)
            if bool((err <= 1.0).all()):
                break
            n *= 2
        if n == n_rec:
            checks = record.at(mid + half * x_chk)
            err = _ratio_rows(_barycentric(v, x_chk.expand(v.shape[0], -1)), checks, ctl.rtol,
                              ctl.atol).masked_fill(failed, 0.0)
        err = err.to(worst.dtype).nan_to_num(math.inf)
        where = torch.where(err > worst, k, where)
        worst = torch.maximum(worst, err)
        kept.append(v[:, ::n_rec // n].clone())
        stats.interpolation_nodes.append(n)
    stats.interpolation_error = float(worst.max()) if kept else 0.0
    bad = (worst > strategy.guard_factor).nonzero()[:, 0].tolist()
    if bad and strategy.on_inaccuracy != "ignore":
        r = bad[int(worst[bad].argmax())]
        k = int(where[r])
        fix = ("raise max_nodes (Interpolated(max_nodes=128)) or " if strategy.nodes == "auto" else
               "use nodes='auto' or more nodes, ")
        guard_alarm(strategy.on_inaccuracy,
                    f"forward solve with method '{config.method.name}' (interpolated, per sample): the Chebyshev "
                    f"interpolant of z of row(s) {_rows(bad)} misses the solver's dense output by up to "
                    f"{float(worst[r]):.3g} times the tolerance (row {r} on [{float(breaks[r, k - 1]):.6g}, "
                    f"{float(breaks[r, k]):.6g}]; rtol={ctl.rtol:g}, atol={ctl.atol:g}); those rows' gradients "
                    f"may be off by more than the tolerance suggests. {fix[0].upper() + fix[1:]}add output "
                    "times inside the interval (where func jumps in t, give each row's jump times as options"
                    "['jump_t'] (B, K): its intervals are split there), or use sensitivity='checkpointed' "
                    "(exact) or 'interpolating'.", stacklevel=8)
    return kept


class _Breaks:
    """Interpolated's intervals per row when rows have ``jump_t`` inside their span (``z`` has a
    kink there, which one polynomial would straddle): row ``b``'s output times ``t_rows[b]``
    ``(T,)`` and its jumps strictly inside its span ``jump_t[b]`` ``(J,)``, merged in time order
    into ``times[b]`` ``(P,)``. A jump outside the row's span, or on one of its output times,
    becomes a repeat of a time, an interval of length 0 (a column that is such in every row is
    dropped), so every row has ``P`` times and the shapes stay ``(B, ...)``.

    ``out[b, k]``: the column of row ``b``'s output time ``k`` (the last of equal times), so that
    its output interval ``k`` is columns ``out[b, k - 1] + 1 .. out[b, k]``, the first of which
    starts at the output time and has a length (a time there never picks an interval of length 0);
    ``columns[k - 1]``: those of interval ``k`` in any row, for :meth:`z`."""

    def __init__(self, t_rows: Tensor, jump_t: np.ndarray) -> None:
        t_host = t_rows.cpu().numpy()
        d = 1.0 if bool((t_host[:, -1] >= t_host[:, 0]).all()) else -1.0
        start, end = t_host[:, :1], t_host[:, -1:]
        inside = (d * (jump_t - start) > 0) & (d * (end - jump_t) > 0)
        key = np.sort(d * np.concatenate([t_host, np.where(inside, jump_t, end)], 1), 1)
        new = np.ones(key.shape[1], dtype=bool)
        new[1:] = (key[:, 1:] != key[:, :-1]).any(0)
        key = key[:, new]
        out = (key[:, None, :] <= d * t_host[:, :, None]).sum(2) - 1
        self.sign, self.times = d, torch.as_tensor(d * key, device=t_rows.device)
        self.out = torch.as_tensor(out, device=t_rows.device)
        self.columns = [range(int(out[:, k - 1].min()) + 1, int(out[:, k].max()) + 1)
                        for k in range(1, out.shape[1])]

    @staticmethod
    def of(t_rows: Tensor, jump_t: np.ndarray) -> _Breaks | None:
        """The rows' intervals split at their jumps, or None where no row has a jump strictly
        inside an output interval (then they are the output intervals, as without jumps)."""
        if not jump_t.shape[1]:
            return None
        breaks = _Breaks(t_rows, jump_t)
        return None if breaks.times.shape[1] == t_rows.shape[1] else breaks

    def z(self, nodes: list[Tensor], k: int, t: Tensor) -> Tensor:
        """Each row's interpolant at its time ``t`` ``(B,)`` inside its output interval ``k``: that
        of its interval holding ``t`` (after the last time before ``t``; the interpolants of the
        two intervals at a jump agree there), ``(B, n)``."""
        lo, hi = self.out[:, k - 1] + 1, self.out[:, k]
        col = (self.sign * (self.times - t.unsqueeze(1)) < 0).sum(1).clamp_(lo, hi).unsqueeze(1)
        z: Tensor | None = None
        for c in self.columns[k - 1]:
            a, b = self.times[:, c - 1], self.times[:, c]
            width = torch.where(b == a, 1.0, b - a)  # another row's interval: no 0/0 computed
            v = _barycentric(nodes[c - 1], ((2.0 * t - a - b) / width).unsqueeze(1))[:, 0]
            z = v if z is None else torch.where(col == c, v, z)
        assert z is not None  # every output interval has a column
        return z


class _TimeGrads(torch.autograd.Function):
    """Identity on ``(y0 (B, n), ys (T, B, n))`` whose backward gives each row its time gradients:
    ``dL/dt[b, k] = g[k, b] . f(t[b, k], y[k, b])`` for ``k > 0`` and ``dL/dt[b, 0] = -(dL/dy0[b] -
    g[0, b]) . f(t[b, 0], y0[b])``, torchdiffeq's convention row by row (see
    :mod:`pyode_bridge._time_grad`). ``t`` ``(B, T)``."""

    @staticmethod
    def forward(ctx: Any, rhs: _Rows, ys: Tensor, t: Tensor) -> Tensor:
        ctx.rhs = rhs
        ctx.save_for_backward(ys, t)
        return ys.clone()

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple:
        ys, t = ctx.saved_tensors
        g_t = None
        if ctx.needs_input_grad[2]:
            t64 = t.detach().to(torch.float64)
            g_t = torch.stack([(grad_ys[k] * ctx.rhs(t64[:, k], ys[k])).sum(1)
                               for k in range(ys.shape[0])], 1).to(t.dtype)
            # A row masked as failed is NaN from its failure on, a constant: no time gradient there
            # (a NaN would reach every row's through a 1-D t's sum).
            g_t = g_t.masked_fill(~torch.isfinite(ys).all(2).T, 0.0)
        if torch.is_grad_enabled():
            grad_ys, g_t = first_order_only(_NO_SECOND_ORDER, [grad_ys, g_t], [grad_ys, ys, t])
        return None, grad_ys, g_t


class _StartTime(torch.autograd.Function):
    """Identity on ``y0 (B, n)`` whose backward adds ``-a_0[b] . f(t0[b], y0[b])`` to ``dL/dt0[b]``."""

    @staticmethod
    def forward(ctx: Any, rhs: _Rows, y0: Tensor, t0: Tensor) -> Tensor:
        ctx.rhs = rhs
        ctx.save_for_backward(y0, t0)
        return y0.clone()

    @staticmethod
    def backward(ctx: Any, grad_y0: Tensor) -> tuple:
        y0, t0 = ctx.saved_tensors
        g_t0 = None
        if ctx.needs_input_grad[2]:
            g_t0 = -(grad_y0 * ctx.rhs(t0.detach().to(torch.float64), y0)).sum(1).to(t0.dtype)
        if torch.is_grad_enabled():
            grad_y0, g_t0 = first_order_only(_NO_SECOND_ORDER, [grad_y0, g_t0], [grad_y0, y0, t0])
        return None, grad_y0, g_t0


def _check_supported(config: SolverConfig, sensitivity: Any, backend: str) -> None:
    """Per-sample mode's limits, each a ValueError naming what to do instead."""
    if not get_backend(backend).solves_per_sample:
        raise ValueError(f"per-sample solving runs on backend='torch' only, got backend={backend!r}")
    tab = config.method
    if not isinstance(tab, ButcherTableau) or tab.implicit:
        raise ValueError(f"per-sample solving supports explicit Runge-Kutta methods (dopri5, tsit5, bosh3, "
                         f"rk4, ...), not method {tab.name!r}; use one of them, or solve jointly (a 1-D t)")
    time, accel = config.time, config.accel
    unsupported = [k for k, on in (("perturb", time.perturb), ("norm", config.control.norm is not None),
                                   ("grid_constructor", time.grid_constructor is not None),
                                   ("compile", accel.compile is not None), ("cuda_graph", accel.cuda_graph))
                   if on]
    if unsupported:
        raise ValueError(f"per-sample solving does not support options {unsupported} yet; drop them or "
                         "solve jointly (a 1-D t, options['step_control']='joint')")
    if config.callbacks:
        raise ValueError("per-sample solving does not call step callbacks (func.callback_step, ...) yet; "
                         "remove them or solve jointly (a 1-D t)")
    if getattr(sensitivity, "checkpointing", False):
        raise ValueError("Interpolating(checkpointing=True) is not available in per-sample mode yet; use "
                         "Interpolating() (the dense output kept) or sensitivity='checkpointed' (only y0 and "
                         "the step record kept), or solve jointly (a 1-D t)")
    if sensitivity.per_sample is None:
        available = [n for n, c in SENSITIVITIES.items() if c.per_sample is not None]
        raise ValueError(f"sensitivity={sensitivity.name!r} is not available in per-sample mode yet; use "
                         f"one of {available} ('checkpointed' keeps only y0 and the step "
                         "record until the backward, 'backsolve' only the outputs), or solve jointly "
                         "(a 1-D t) with it")


def _adjoint_forward(strategy: Any, run: Callable[..., SampleResult], t_rows: Tensor, stats: SolveStats,
                     config: SolverConfig, jump_t: np.ndarray) -> tuple[Callable[[Tensor], SampleResult], ZAt | None]:
    """An adjoint's forward solve ``forward(y0)`` and the ``z_at`` its sweep reads ``z(t)`` from:
    backsolve: the plain solve and None; interpolating: the forward's dense output, kept row by row
    (:class:`_DenseRecord`); interpolated: each row's Chebyshev nodes read from it
    (:func:`_chebyshev_nodes`, on each row's output intervals split at its ``jump_t`` ``(B, J)``:
    :class:`_Breaks`; the dense output is dropped when the forward ends)."""
    if strategy.per_sample == "backsolve":
        return run, None
    dense = strategy.per_sample == "dense"
    record = _DenseRecord(t_rows, config.control.atol, watch=dense)
    breaks = None if dense else _Breaks.of(t_rows, jump_t)
    nodes: list[Tensor] = []

    def forward(y0: Tensor) -> SampleResult:
        res = run(y0, on_step=record)
        if dense:
            _interpolating_guard(record, strategy, stats, config)
        else:
            # A row masked as failed (on_failure="mask") has no z past its failure: neither its
            # nodes nor its guard figure count (its gradient is not one).
            failed = (res.sample_status != 0).to(t_rows.device)
            nodes.extend(_chebyshev_nodes(record, t_rows if breaks is None else breaks.times, strategy, stats,
                                          config, failed))
            record.steps, record.stacked = [], []
        return res

    def chebyshev_z(k: int, t: Tensor) -> Tensor:
        if breaks is not None:
            return breaks.z(nodes, k, t)
        a, b = t_rows[:, k - 1], t_rows[:, k]
        return _barycentric(nodes[k - 1], ((2.0 * t - a - b) / (b - a)).unsqueeze(1))[:, 0]

    return forward, (lambda k, t: record.at(t.unsqueeze(1))[:, 0]) if dense else chebyshev_z


@dataclass
class Setup:
    """A per-sample problem, checked: ``y0``'s ``spec``, the batch size ``B``, the solver ``config``,
    the gradient ``strategy``, each row's ``stops`` (``step_t``, ``jump_t``, float64 ``(B, K)``),
    its times ``t_rows`` (float64 ``(B, T)``), ``func`` on row states (``rhs``), ``on_failure``
    and the ``stats`` (reset)."""

    spec: StateSpec
    B: int
    config: SolverConfig
    strategy: Any
    stops: tuple[np.ndarray, np.ndarray]
    t_rows: Tensor
    rhs: _Rows
    on_failure: str
    stats: SolveStats


def setup(func: Callable[..., Any], y0: State, t: Tensor | Sequence[float], *, rtol: float, atol: float,
          method: Any, options: dict[str, Any] | None, sensitivity: Any, stats: SolveStats | None,
          backend: str) -> Setup:
    """Check and prepare a per-sample problem (``t`` ``(B, T)`` or ``(T,)``); see :class:`Setup`."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        # Each row's steps are decided on the host from the values, which torch.func's wrapped
        # tensors do not give (PyTorch would fail deep in the solve on a missing data pointer).
        raise ValueError("per-sample solving does not run under torch.func transforms (grad, jacrev, jvp, "
                         "vmap, ...); differentiate with torch.autograd (loss.backward(), "
                         "torch.autograd.grad), or solve jointly (a 1-D t, sensitivity='backprop') under "
                         "torch.func.grad/jacrev")
    t_dim = t.dim() if isinstance(t, Tensor) else 1
    _, on_failure, rest = per_sample_options(options, t_dim)
    check_state(y0)
    spec = StateSpec(y0)
    if t_dim == 2:
        assert isinstance(t, Tensor)
        B = check_sample_times(t, y0, spec.device).shape[0]
    else:
        B = _batch_size(y0, "options['step_control']='per_sample'")
    # Per-row stops (B, K) are checked here; make_config checks shared 1-D ones.
    per_row = {k: rest.pop(k) for k in ("step_t", "jump_t")
               if isinstance(rest.get(k), Tensor) and rest[k].dim() == 2}
    config = make_config(method, rest, rtol, atol, spec.dtype, spec=spec)
    strategy = resolve_sensitivity("backprop" if sensitivity is None else sensitivity)
    _check_supported(config, strategy, backend)
    # Each row's (step_t, jump_t), float64 (B, K): a shared 1-D tuple repeated for every row.
    step_t, jump_t = (v.numpy() if isinstance(v, Tensor) else np.tile(np.asarray(v, dtype=np.float64), (B, 1))
                      if len(v) else np.empty((B, 0))  # no stops (the common case): no tile
                      for v in check_sample_stops(per_row.get("step_t", config.time.step_t),
                                                  per_row.get("jump_t", config.time.jump_t), B))
    stops = (step_t, jump_t)
    if t_dim == 2:
        assert isinstance(t, Tensor)
        t_rows = t.detach().to(torch.float64)
    else:
        t_rows = torch.tensor(check_time(t, spec.dtype, spec.device), dtype=torch.float64,
                              device=spec.device).expand(B, -1)
    t_rows = t_rows.contiguous()
    stats = SolveStats() if stats is None else stats
    stats.reset()
    rhs = _Rows(func, spec, config.time.dtype or spec.dtype, B, keep_nan_out=on_failure == "mask")
    return Setup(spec, B, config, strategy, stops, t_rows, rhs, on_failure, stats)


def solve_per_sample(func: Callable[..., Any], y0: State, t: Tensor | Sequence[float], *, rtol: float,
                     atol: float, method: Any, options: dict[str, Any] | None, sensitivity: Any,
                     stats: SolveStats | None, backend: str, adjoint_params: Iterable[Tensor] | None,
                     adjoint_rtol: float | None = None, adjoint_atol: float | None = None) -> State:
    """:func:`pyode_bridge.odeint` in per-sample mode: ``y`` at each row's times, shape
    ``(T, B, ...)`` (a tuple of such for a tuple ``y0``); ``t`` ``(B, T)`` or ``(T,)``."""
    problem = setup(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, sensitivity=sensitivity,
                    stats=stats, backend=backend)
    spec, B, config, strategy, stops = problem.spec, problem.B, problem.config, problem.strategy, problem.stops
    t_rows, rhs, on_failure, stats = problem.t_rows, problem.rhs, problem.on_failure, problem.stats
    splits = rhs.sizes if spec.is_tuple else None
    t_dim = t.dim() if isinstance(t, Tensor) else 1

    def run(y: Tensor, record: bool = False, replay: list | None = None, on_step: Any = None) -> SampleResult:
        return integrate_per_sample(rhs, y, t_rows, config, splits=splits, on_failure=on_failure,
                                    record=record, replay=replay, on_step=on_step, stops=stops,
                                    time_dtype=rhs.time_dtype)

    t_grad = torch.is_grad_enabled() and isinstance(t, Tensor) and t.requires_grad
    y_rows = rhs.rows(y0)
    if t_grad:
        assert isinstance(t, Tensor)
        t_full = t if t_dim == 2 else t.expand(B, -1)
        y_rows = _StartTime.apply(rhs, y_rows, t_full[:, 0])
    if strategy.per_sample != "autograd" and torch.is_grad_enabled():
        listed = unique_tensors(adjoint_params if adjoint_params is not None else find_parameters(func))
        check_params(listed, spec.dtype, spec.device)
        params = [p for p in listed if p.requires_grad]
        out: list = []
        if strategy.per_sample == "replay":
            ys = _Checkpointed.apply(run, out, y_rows, *params)
        else:
            # The strategy's rtol=, atol= over adjoint_rtol/adjoint_atol, as in joint mode.
            own_rtol, own_atol = getattr(strategy, "rtol", None), getattr(strategy, "atol", None)
            adjoint = config.with_tolerances(adjoint_rtol if own_rtol is None else own_rtol,
                                             adjoint_atol if own_atol is None else own_atol)
            forward, z_at = _adjoint_forward(strategy, run, t_rows, stats, config, stops[1])
            nfe0 = [0]

            def sweep(ys: Tensor, grad_ys: Tensor, params: Sequence[Tensor]) -> tuple:
                nfe0[0] = rhs.nfe
                rhs.keep_nan_out = False  # the sweep zeroes a masked row's state itself
                grads = _adjoint_sweep(rhs, t_rows, adjoint, stats, strategy, ys, grad_ys, params, z_at, stops)
                stats.nfe_backward += rhs.nfe - nfe0[0]
                return grads

            ys = _Adjoint.apply(strategy.name, forward, sweep, out, y_rows, *params)
        res = out[0]
    else:
        # Under no_grad a view of a grad-requiring y0 keeps requires_grad without a graph: a func
        # differentiating inside (a CNF's trace) would get a zero derivative from it.
        res = run(y_rows if torch.is_grad_enabled() else y_rows.detach())
        ys = res.ys
    if t_grad:
        ys = _TimeGrads.apply(rhs, ys, t_full)
    stats.nfe_forward = rhs.nfe
    stats.steps_forward, stats.steps_rejected = res.steps, res.rejected
    stats.sample_steps, stats.sample_status = res.sample_steps, res.sample_status
    return rhs.trajectory(ys)
