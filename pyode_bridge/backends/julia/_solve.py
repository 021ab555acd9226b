"""``odeint(..., backend="julia")``: the autograd Function around a SciML solve.

Forward: ``PyodeBridge.forward_solve`` (the Julia solution handle stays in ``ctx``). Backward:
``PyodeBridge.adjoint_solve``, i.e. ``adjoint_sensitivities(sol, alg; t, dgdu_discrete,
sensealg, abstol, reltol)`` fed with the incoming output gradients; it returns ``du0`` and the flat
``dp``, which become the gradients of ``y0`` and of the parameters.

Threads: every call into Julia must come from the thread that started it (a call from another
thread can deadlock in Julia's garbage collector). torch runs the backward pass of CUDA tensors on
its own device threads, so the backend turns that off for the Julia thread
(``torch.autograd.set_multithreading_enabled(False)``, thread-local) and every Julia call checks
its thread first (:func:`~._loader.check_thread`), raising instead of hanging.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..._state import StateSpec
from ...errors import SolverError
from ...solvers import SolverConfig
from ...stats import SolveStats
from ._handoff import julia_view, matrix_from_julia, matrix_to_julia, vector_to_julia
from ._loader import check_thread, keep_backward_on_this_thread, load_cuda, load_julia
from ._options import (
    JuliaSensitivity,
    check_checkpointing,
    method_label,
    resolve_sensitivity,
    solver_kwargs,
)
from ._options import julia_method as _julia_method
from ._rhs import TorchRHS

__all__ = ["odeint_julia", "JuliaPlan", "device_args"]


def device_args(device: torch.device) -> tuple[str, int]:
    """``(device type, CUDA index)`` for ``PyodeBridge.PyRHS``: the index of a ``cuda`` device
    (torch's current device when the tensor's device has none), -1 on the CPU."""
    if device.type != "cuda":
        return device.type, -1
    return "cuda", device.index if device.index is not None else torch.cuda.current_device()


def _jl_kwargs(kw: dict) -> dict:
    """Python values as ``forward_solve``/``adjoint_solve`` keywords (lists as float64 arrays)."""
    out = dict(kw)
    if out.get("tstops") is not None:
        out["tstops"] = np.asarray(out["tstops"], dtype=np.float64)
    return out


class JuliaPlan:
    """Everything one julia solve needs, for the forward and the backward pass."""

    def __init__(self, bridge, rhs: TorchRHS, spec: StateSpec, t_eval: list, sens: JuliaSensitivity,
                 alg, adj_alg, fwd_kw: dict, adj_kw: dict, stats: SolveStats):
        self.bridge, self.rhs, self.spec, self.sens = bridge, rhs, spec, sens
        self.alg, self.adj_alg = alg, adj_alg
        self.fwd_kw, self.adj_kw = _jl_kwargs(fwd_kw), _jl_kwargs(adj_kw)
        self.stats = stats
        self.ts = np.asarray(t_eval, dtype=np.float64)
        self.dtype = "float32" if spec.dtype == torch.float32 else "float64"
        self._jrhs = None

    def _julia_rhs(self):
        if self._jrhs is None:
            r = self.rhs
            kind, index = device_args(self.spec.device)
            self._jrhs = self.bridge.PyRHS(r.forward, r.forward_graph, r.pullback, r.vjp, r.jac,
                                           r.tgrad, self.dtype, kind, index)
        return self._jrhs

    def _flat_params(self) -> torch.Tensor:
        flat = self.rhs.flat.flatten()
        if flat.numel() == 0:
            return torch.zeros(0, dtype=self.spec.dtype, device=self.spec.device)
        return flat.to(dtype=self.spec.dtype)

    def _failure(self, e: Exception, phase: str, alg) -> BaseException:
        """The exception to raise for a failed Julia call: the Python callback's own exception
        when one caused it; a ValueError for a Julia ``ArgumentError`` (an argument PyodeBridge
        refused: an algorithm pushing ForwardDiff duals into torch, a fixed-step plan without a
        step size, ...); else a SolverError carrying the Julia error."""
        err = self.rhs.error
        self.rhs.error = None
        if err is not None:
            return err
        text = str(e).strip()
        if text.startswith("ArgumentError"):
            return ValueError(f"{phase} with method '{method_label(alg)}' (backend='julia'): {text}")
        return SolverError(f"{phase} with method '{method_label(alg)}' (backend='julia') failed in "
                           f"Julia: {e}")

    def forward(self, y0: torch.Tensor, kind: str | None = None) -> tuple[torch.Tensor, object]:
        """Solve from ``y0`` (flat); returns ``ys (T, N)`` and the Julia solution handle."""
        check_thread("the forward solve")
        kind = self.sens.kind if kind is None else kind
        checkpointing = self.sens.uses_checkpointing if kind == self.sens.kind else True
        nfe0 = self.rhs.nfe
        self.rhs.error = None
        try:
            res = self.bridge.forward_solve(
                self._julia_rhs(), vector_to_julia(y0), vector_to_julia(self._flat_params()),
                self.ts, self.alg, kind=kind, checkpointing=checkpointing, **self.fwd_kw)
        except Exception as e:  # noqa: BLE001 - re-raised as the callback's error or SolverError
            raise self._failure(e, "forward solve", self.alg) from e
        sol, Y, ok, retcode, t_end, _nf, naccept, nreject = res
        self.stats.nfe_forward += self.rhs.nfe - nfe0
        self.stats.steps_forward += max(int(naccept), 0)
        self.stats.steps_rejected += max(int(nreject), 0)
        if not ok:
            raise SolverError(
                f"forward solve with method '{method_label(self.alg)}' (backend='julia') stopped at "
                f"t={float(t_end):.6g} with OrdinaryDiffEq return code {retcode} "
                f"(t runs from {self.ts[0]:.6g} to {self.ts[-1]:.6g}). MaxIters: raise "
                f"options['max_num_steps'] (now {self.fwd_kw['maxiters']}); DtLessThanMin or "
                "Unstable: the ODE may be stiff (try method='Rodas5P' or 'KenCarp4') or blow up; "
                "loosening rtol/atol can also help.")
        return matrix_from_julia(Y), sol

    def backward(self, sol, grad_ys: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Gradients of ``y0`` and of the parameters from the output gradients ``(T, N)``."""
        check_thread("the backward pass")
        nfe0, nvjp0 = self.rhs.nfe, self.rhs.nvjp
        self.rhs.error = None
        G = grad_ys.detach().to(dtype=self.spec.dtype).reshape(len(self.ts), self.spec.numel)
        try:
            with self.rhs.solving("backward pass (backend='julia')"):
                gu, gp = self.bridge.adjoint_solve(
                    sol, self.ts, matrix_to_julia(G), self.adj_alg, kind=self.sens.kind,
                    checkpointing=self.sens.uses_checkpointing, **self.adj_kw)
        except Exception as e:  # noqa: BLE001 - re-raised as the callback's error or SolverError
            raise self._failure(e, "backward pass", self.adj_alg) from e
        finally:
            self.rhs.release()
        self.stats.nfe_backward += (self.rhs.nfe - nfe0) + (self.rhs.nvjp - nvjp0)
        g_y0 = julia_view(gu).clone().reshape(-1)
        g_p = julia_view(gp).clone().reshape(-1)
        flat = self.rhs.flat
        g_params = flat.unflatten(g_p.to(dtype=self.spec.dtype)) if flat.numel else ()
        return g_y0, tuple(g.to(dtype=p.dtype) for g, p in zip(g_params, flat.params))


class _JuliaSolve(torch.autograd.Function):
    """Inputs ``(plan, y0 (N,), *params)``; output ``ys (T, N)``."""

    @staticmethod
    def forward(ctx, plan: JuliaPlan, y0: torch.Tensor, *params):
        ys, sol = plan.forward(y0.detach())
        ctx.plan, ctx.sol = plan, sol
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys):
        g_y0, g_params = ctx.plan.backward(ctx.sol, grad_ys)
        return (None, g_y0, *g_params)


def _adjoint_method(config: SolverConfig, adjoint_config: SolverConfig, forward,
                    julia_adjoint_method) -> tuple:
    if julia_adjoint_method is not None:
        return _julia_method(julia_adjoint_method)
    if adjoint_config.method.name == config.method.name:
        return _julia_method(forward)
    return _julia_method(adjoint_config.method.name)


def odeint_julia(func, y0, t, *, spec: StateSpec, t_eval: list, config: SolverConfig,
                 adjoint_config: SolverConfig, sensitivity, params: tuple, stats: SolveStats,
                 julia_method: str | Any | None = None,
                 julia_adjoint_method: str | Any | None = None):
    """Solve with SciML (see :func:`pyode_bridge.odeint`); called by ``odeint`` after validation.

    Args:
        julia_method: an OrdinaryDiffEq algorithm name (``"Vern7"``, ``"Rodas5P"``, ...) or a
            juliacall algorithm object (diffeqpy's ``de.Vern7()``) that overrides ``config``'s
            method; ``config`` then only supplies the options.
        julia_adjoint_method: the same for the adjoint solve.

    Raises:
        ValueError: an argument the julia backend does not support (before Julia is started).
        BackendUnavailableError: Julia cannot be started (nothing is solved with torch instead).
        SolverError: the solve failed.
    """
    sens = resolve_sensitivity(sensitivity)
    # `is not None`: a juliacall object has no Python truth value to rely on
    forward_name = julia_method if julia_method is not None else config.method.name
    alg, fixed = _julia_method(forward_name)
    adj_alg, adj_fixed = _adjoint_method(config, adjoint_config, forward_name, julia_adjoint_method)
    adj_config = adjoint_config.with_tolerances(sens.rtol, sens.atol)
    fwd_kw = solver_kwargs(config, t_eval, fixed)
    adj_kw = solver_kwargs(adj_config, t_eval, adj_fixed, adjoint=True)
    check_checkpointing(sens, fwd_kw, forward_name)
    if spec.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='julia' runs on CPU or CUDA tensors, not {spec.device}; use "
                         "backend='torch'")

    bridge = load_julia()
    check_thread("a julia solve")
    keep_backward_on_this_thread()
    if spec.device.type == "cuda":
        load_cuda()

    y0_flat = spec.flatten(y0)
    if len(t_eval) == 1:
        return spec.unflatten_time(y0_flat.unsqueeze(0))
    rhs = TorchRHS(func, spec, params, config.time.dtype, method_label(alg))
    plan = JuliaPlan(bridge, rhs, spec, t_eval, sens, alg, adj_alg, fwd_kw, adj_kw, stats)
    grad_needed = torch.is_grad_enabled() and (
        y0_flat.requires_grad or any(p.requires_grad for p in params))
    if grad_needed:
        ys = _JuliaSolve.apply(plan, y0_flat, *params)
    else:
        ys, _ = plan.forward(y0_flat.detach(), kind="backsolve")  # saves only the outputs
    return spec.unflatten_time(ys)
