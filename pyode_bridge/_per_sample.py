"""Per-sample solving's front door (issue 18): a 2-D ``t`` ``(B, T)`` or
``options={"step_control": "per_sample"}`` solves every batch row with its own times, step size,
error test and failure (:mod:`~pyode_bridge.solvers.per_sample`), ``func`` seeing ``t`` of shape
``(B,)``. Gradients: ``backprop`` and ``checkpointed`` (a bit-for-bit replay of the recorded steps);
``dL/dt`` per row."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ._state import State, StateSpec, find_parameters, unique_tensors
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
from .sensitivity import resolve_sensitivity
from .sensitivity.base import guard_alarm
from .solvers import SolverConfig
from .solvers.loop import stage_rows
from .solvers.per_sample import SampleResult, SampleStep, integrate_per_sample
from .solvers.tableau import ButcherTableau
from .stats import SolveStats

__all__ = ["requested", "solve_per_sample", "NO_EVENTS"]

NO_EVENTS = ("per-sample event handling (event_fn with a 2-D t or options['step_control']='per_sample') is "
             "not supported yet; find each sample's event with odeint_event on its own, or jointly (a 1-D t)")

#: The gradient methods per-sample mode runs, and those it refuses (with the alternatives named).
SAMPLE_SENSITIVITIES = ("backprop", "checkpointed", "backsolve")


def requested(t: Any, options: Any) -> bool:
    """Whether ``odeint(..., t, options=options)`` asks for per-sample control (a 2-D ``t`` of at
    least two times per row, or ``options["step_control"] == "per_sample"``). A column ``(T, 1)``
    is the common slip of a 1-D ``t``: it gets the 1-D check's fix (``t.reshape(-1)``)."""
    return ((isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] > 1)
            or (isinstance(options, Mapping) and options.get("step_control") == "per_sample"))


class _Rows:
    """``func`` on row states: ``rhs(t (B,) float64, y (B, n)) -> (B, n)``, ``func`` seeing ``t`` of
    shape ``(B,)`` in ``time_dtype`` and ``y`` in ``y0``'s structure; counts its evaluations."""

    def __init__(self, func: Callable[..., Any], spec: StateSpec, time_dtype: torch.dtype, batch: int) -> None:
        self.func, self.spec, self.time_dtype, self.batch, self.nfe = func, spec, time_dtype, batch, 0
        self.sizes = [n // batch for n in spec.numels]

    def state(self, y: Tensor) -> State:
        """``(B, n)`` -> ``y0``'s structure."""
        if not self.spec.is_tuple:
            return y.reshape(self.spec.shapes[0])
        return tuple(p.reshape(s) for p, s in zip(y.split(self.sizes, 1), self.spec.shapes))

    def rows(self, y: State) -> Tensor:
        """``y0``'s structure -> ``(B, n)``."""
        parts = y if isinstance(y, (tuple, list)) else (y,)
        return torch.cat([p.reshape(self.batch, -1) for p in parts], 1) if len(parts) > 1 \
            else parts[0].reshape(self.batch, -1)

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        t_func, state = t.to(self.time_dtype), self.state(y)
        if self.nfe == 1:  # func written for a 0-d t: a ValueError naming the fix, not a broadcast
            return self.rows(check_per_sample_func(self.func, state, t_func))
        return self.rows(self.func(t_func, state))

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
        with torch.no_grad():
            res = run(y0, record=True)
        out.append(res)
        ctx.run, ctx.record = run, res.record
        ctx.save_for_backward(y0, *params)
        return res.ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple:
        y0, *params = ctx.saved_tensors
        with torch.enable_grad():
            y = y0.detach().requires_grad_(True)
            ys = ctx.run(y, replay=ctx.record).ys
            wrt = [y, *params]
            grads = torch.autograd.grad(ys, wrt, grad_ys, allow_unused=True)
        return (None, None, *grads)


class _Backsolve(torch.autograd.Function):
    """The forward solve without a graph; the backward integrates the adjoint system
    ``(y, a)`` of every row backwards over its own output intervals with its own steps (``y`` restarted
    from the forward's output at each time, ``a`` jumping by the output's gradient there), and the
    parameter integral ``-int a^T df/dtheta dt`` summed over the rows. The rows' error control covers
    ``y`` and ``a`` (each part on its own); the parameter integral is not error-controlled (as with
    ``adjoint_options={"norm": "seminorm"}``)."""

    @staticmethod
    def forward(ctx: Any, run: Callable[..., SampleResult], sweep: Callable[..., tuple], out: list,
                y0: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            res = run(y0)
        out.append(res)
        ctx.sweep = sweep
        ctx.save_for_backward(res.ys, *params)
        return res.ys

    @staticmethod
    def backward(ctx: Any, grad_ys: Tensor) -> tuple:
        ys, *params = ctx.saved_tensors
        grad_y0, grad_params = ctx.sweep(ys, grad_ys, params)
        return (None, None, None, grad_y0, *grad_params)


def _adjoint_sweep(rhs: _Rows, t_rows: Tensor, config: SolverConfig, stats: SolveStats, guard: Any,
                   ys: Tensor, grad_ys: Tensor, params: Sequence[Tensor],
                   stops: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Tensor, list]:
    """``(dL/dy0 (B, n), [dL/dtheta])`` from the outputs ``ys`` ``(T, B, n)`` and their gradients,
    by the adjoint sweep of :class:`_Backsolve` (``stops``: each row's ``(step_t, jump_t)`` ``(B, K)``,
    landed on backwards too).

    The guard, per row: where the reverse-solved state ends an interval further from the forward's
    output than ``guard.max_error`` relative to it (``||dz|| / (||z|| + atol sqrt(n))`` over the row),
    the adjoint and the parameter integrand were evaluated that far off, and the row's gradient
    may be off by about as much; ``guard.on_instability`` decides (warn, raise, ignore). A
    conservative stand-in for joint backsolve's calibrated estimate (``stats.backsolve_error`` stays
    None)."""
    n = ys.shape[2]
    tab = config.method
    assert isinstance(tab, ButcherTableau)  # per-sample mode runs explicit Runge-Kutta tableaux only
    b_row = stage_rows(tab).b
    weights = dict(zip(b_row.idx, b_row.coefs))
    tape: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # id(stage) -> (stage, f, a): graphs kept
    grads = [torch.zeros_like(p) for p in params]

    def augmented(t: Tensor, z: Tensor) -> Tensor:
        y, a = z[:, :n], z[:, n:]
        with torch.enable_grad():
            y_in = y.detach().requires_grad_(True)
            f = rhs(t, y_in)
            (vjp,) = torch.autograd.grad(f, y_in, a, retain_graph=bool(params))
        out = torch.cat([f.detach(), -vjp], 1)
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
    for k in range(ys.shape[0] - 1, 0, -1):
        z0 = torch.cat([ys[k], a], 1)
        res = integrate_per_sample(augmented, z0, t_rows[:, [k, k - 1]].contiguous(), config, splits=[n, n],
                                   context="backward pass (backsolve)",
                                   on_accept=quadrature if params else None, stops=stops,
                                   time_dtype=rhs.time_dtype)
        stats.steps_backward += res.steps
        stats.steps_backward_rejected += res.rejected
        a = res.ys[-1][:, n:] + grad_ys[k - 1]
        if guard.on_instability != "ignore":
            off = (torch.linalg.vector_norm(res.ys[-1][:, :n] - ys[k - 1], dim=1)
                   / (torch.linalg.vector_norm(ys[k - 1], dim=1) + config.control.atol * math.sqrt(n)))
            drift = torch.maximum(drift, off.nan_to_num(math.inf))
    bad = (drift > guard.max_error).nonzero()[:, 0].tolist()
    if bad:
        guard_alarm(guard.on_instability,
                    f"backward pass (backsolve, per sample): the reverse-solved state of row(s) {bad[:8]}"
                    f"{' ...' if len(bad) > 8 else ''} drifted from the forward's by up to "
                    f"{100 * float(drift.max()):.3g}% (row {int(drift.argmax())}); those rows' gradients may be "
                    "off by about as much. Use sensitivity='checkpointed' (exact), tighten adjoint_rtol/"
                    "adjoint_atol, or add output times (the state restarts from the forward's there)",
                    stacklevel=4)
    return a, grads


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
        return None, grad_y0, g_t0


def _check_supported(config: SolverConfig, sensitivity: Any, backend: str) -> None:
    """Per-sample mode's limits, each a ValueError naming what to do instead."""
    if backend != "torch":
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
    if sensitivity.name not in SAMPLE_SENSITIVITIES:
        raise ValueError(f"sensitivity={sensitivity.name!r} is not available in per-sample mode yet; use "
                         f"one of {list(SAMPLE_SENSITIVITIES)} ('checkpointed' keeps only y0 and the step "
                         "record until the backward, 'backsolve' only the outputs), or solve jointly "
                         "(a 1-D t) with it")


def solve_per_sample(func: Callable[..., Any], y0: State, t: Tensor | Sequence[float], *, rtol: float,
                     atol: float, method: Any, options: dict[str, Any] | None, sensitivity: Any,
                     stats: SolveStats | None, backend: str, adjoint_params: Iterable[Tensor] | None,
                     adjoint_rtol: float | None = None, adjoint_atol: float | None = None) -> State:
    """:func:`pyode_bridge.odeint` in per-sample mode: ``y`` at each row's times, shape
    ``(T, B, ...)`` (a tuple of such for a tuple ``y0``); ``t`` ``(B, T)`` or ``(T,)``."""
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
    rhs = _Rows(func, spec, config.time.dtype or spec.dtype, B)
    splits = rhs.sizes if spec.is_tuple else None

    def run(y: Tensor, record: bool = False, replay: list | None = None) -> SampleResult:
        return integrate_per_sample(rhs, y, t_rows, config, splits=splits, on_failure=on_failure,
                                    record=record, replay=replay, stops=stops, time_dtype=rhs.time_dtype)

    t_grad = torch.is_grad_enabled() and isinstance(t, Tensor) and t.requires_grad
    y_rows = rhs.rows(y0)
    if t_grad:
        assert isinstance(t, Tensor)
        t_full = t if t_dim == 2 else t.expand(B, -1)
        y_rows = _StartTime.apply(rhs, y_rows, t_full[:, 0])
    if strategy.name != "backprop" and torch.is_grad_enabled():
        listed = unique_tensors(adjoint_params if adjoint_params is not None else find_parameters(func))
        check_params(listed, spec.dtype, spec.device)
        params = [p for p in listed if p.requires_grad]
        out: list = []
        if strategy.name == "checkpointed":
            ys = _Checkpointed.apply(run, out, y_rows, *params)
        else:
            # Backsolve(rtol=, atol=) over adjoint_rtol/adjoint_atol, as in joint mode.
            own_rtol, own_atol = getattr(strategy, "rtol", None), getattr(strategy, "atol", None)
            adjoint = config.with_tolerances(adjoint_rtol if own_rtol is None else own_rtol,
                                             adjoint_atol if own_atol is None else own_atol)
            nfe0 = [0]

            def sweep(ys: Tensor, grad_ys: Tensor, params: Sequence[Tensor]) -> tuple:
                nfe0[0] = rhs.nfe
                grads = _adjoint_sweep(rhs, t_rows, adjoint, stats, strategy, ys, grad_ys, params, stops)
                stats.nfe_backward += rhs.nfe - nfe0[0]
                return grads

            ys = _Backsolve.apply(run, sweep, out, y_rows, *params)
        res = out[0]
    else:
        res = run(y_rows)
        ys = res.ys
    if t_grad:
        ys = _TimeGrads.apply(rhs, ys, t_full)
    stats.nfe_forward = rhs.nfe
    stats.steps_forward, stats.steps_rejected = res.steps, res.rejected
    stats.sample_steps, stats.sample_status = res.sample_steps, res.sample_status
    return rhs.trajectory(ys)
