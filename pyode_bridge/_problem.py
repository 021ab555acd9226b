"""One preparation of a solve for :func:`~pyode_bridge.odeint` and its event search
(:func:`prepare`), and the solve over the times ``t`` without ``event_fn`` (:func:`solve`).
``odeint`` imports this module and :mod:`~pyode_bridge.events`, which imports it too: no cycle."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence, Tuple

import torch

from ._state import State, StateSpec, find_parameters, unique_tensors
from ._time_grad import attach_time_gradients
from ._validate import (
    StateNorm,
    check_params,
    check_state,
    check_time,
    default_adjoint_norm,
    make_config,
    per_sample_options,
    step_callbacks,
)
from .backends.base import Prepared, get_backend
from .solvers import SolverConfig
from .stats import SolveStats

__all__ = ["prepare", "adjoint_config", "solve"]


def prepare(func: Callable[..., Any], y0: State, t: torch.Tensor | Sequence[float], *, rtol: float,
            atol: float, method: Any, options: dict[str, Any] | None, sensitivity: Any,
            stats: SolveStats | None, backend: str, adjoint_params: Iterable[torch.Tensor] | None,
            defer_params: bool = True) -> Prepared:
    """Check ``odeint``'s arguments (``ValueError`` naming the fix) and parse them once.

    ``defer_params=False`` always lists and checks the parameters (the event search reads whether
    one requires grad whatever the gradient method).
    """
    chosen = get_backend(backend)
    check_state(y0)
    spec = StateSpec(y0)
    strategy = chosen.resolve_sensitivity(sensitivity)
    t_grad = torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad
    t_eval = check_time(t, spec.dtype, spec.device)
    method, native_method = chosen.split_method(method)
    # func sees t in the state's dtype (as torchdiffeq); the solver's own time arithmetic is float64.
    config = make_config(method, options, rtol, atol, spec.dtype, spec=spec)
    config = replace(config, callbacks=step_callbacks(func, spec, config))
    # backprop needs no list of func's parameters (autograd finds them; only cuda_graph reads them,
    # to tell whether a gradient is wanted), and walking a module on every solve costs as much as a
    # stage of a small field: their dtype and device are then checked only if the solve fails (to
    # name the cause instead of torch's low-level error).
    defer = (defer_params and chosen.through_autograd(strategy) and adjoint_params is None
             and not config.accel.cuda_graph)
    params: Tuple[torch.Tensor, ...] = ()
    if not defer:
        listed = unique_tensors(adjoint_params if adjoint_params is not None else find_parameters(func))
        check_params(listed, spec.dtype, spec.device)
        # A listed tensor that does not require grad has no gradient to receive (torchdiffeq drops it
        # too); kept, the backward would ask autograd for func's derivative with respect to it and fail.
        params = tuple(p for p in listed if p.requires_grad)
    parts = tuple(y0) if spec.is_tuple else (y0,)
    grad_needed = torch.is_grad_enabled() and (t_grad or any(p.requires_grad for p in parts)
                                               or any(p.requires_grad for p in params))
    if not chosen.accelerates and (config.accel.compile is not None or config.accel.cuda_graph):
        raise ValueError("options['compile'] and options['cuda_graph'] speed up the torch backend's "
                         f"Runge-Kutta steps; backend={chosen.name!r} runs its own solver: drop them")
    stats = SolveStats() if stats is None else stats
    stats.reset()
    return Prepared(func, y0, t, spec, t_eval, t_grad, chosen, strategy, native_method, config, params,
                    defer, grad_needed, stats)


def adjoint_config(prep: Prepared, method: Any, options: dict[str, Any] | None, rtol: float, atol: float,
                   adjoint_rtol: float | None, adjoint_atol: float | None) -> tuple[SolverConfig, Any]:
    """The backward solves' configuration from ``adjoint_method``/``adjoint_options`` (default: the
    forward's, without its ``first_step`` and with the adjoint norm built from its ``norm``), and the
    backend's own adjoint method (or None)."""
    config, spec, backend = prep.config, prep.spec, prep.backend
    method, native = backend.split_method(method)
    backward_solves = backend.solves_backward(prep.sensitivity)
    if method is None and options is None and not backward_solves:
        return config, native  # never read: this method solves nothing backwards
    if method is None and options is None:
        # The forward's first_step belongs to t[0]; backward solves start from t[-1]. Its norm is
        # for the forward state: the adjoint methods build theirs (from it, as torchdiffeq does).
        adjoint = config.with_control(first_step=None, norm=None)
    elif options is None and (method or config.method.name) == config.method.name:
        # The forward's options, parsed already, except its norm (the adjoint's is built below).
        adjoint = replace(config.with_control(norm=None, seminorm=False), callbacks=None)
    else:
        adjoint = make_config(method or config.method.name, options, rtol, atol, spec.dtype, spec=spec,
                              adjoint=True)
    norm = config.control.norm
    if adjoint.control.adjoint_norm is None and isinstance(norm, StateNorm):
        adjoint = adjoint.with_control(adjoint_norm=default_adjoint_norm(norm.state_norm, spec,
                                                                         adjoint.control.seminorm))
    adjoint = adjoint.with_tolerances(adjoint_rtol, adjoint_atol)
    if backward_solves:
        # The methods with backward solves call the _adjoint callbacks (backprop/checkpointed never).
        adjoint = replace(adjoint, callbacks=step_callbacks(prep.func, spec, adjoint, adjoint=True))
    return adjoint, native


def solve(func: Callable[..., Any], y0: State, t: torch.Tensor | Sequence[float], *, rtol: float = 1e-7,
          atol: float = 1e-9, method: Any = None, options: dict[str, Any] | None = None,
          sensitivity: Any = None, stats: SolveStats | None = None, backend: str = "torch",
          adjoint_params: Iterable[torch.Tensor] | None = None, adjoint_rtol: float | None = None,
          adjoint_atol: float | None = None, adjoint_method: Any = None,
          adjoint_options: dict[str, Any] | None = None) -> State:
    """:func:`pyode_bridge.odeint` without ``event_fn``, in joint mode: ``y`` at every time of ``t``,
    shape ``(T, *S)`` (a tuple of such for a tuple ``y0``). Per-sample mode (a 2-D ``t``, or
    ``options["step_control"] == "per_sample"``) is :func:`~pyode_bridge._per_sample.solve_per_sample`,
    which ``odeint`` calls instead."""
    if isinstance(options, dict) and ("step_control" in options or "on_failure" in options):
        options = per_sample_options(options, 1)[2]  # "joint"/"raise", the defaults, spelled out
    prep = prepare(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                   sensitivity=sensitivity, stats=stats, backend=backend,
                   adjoint_params=adjoint_params)
    adjoint, native_adjoint = adjoint_config(prep, adjoint_method, adjoint_options, rtol, atol,
                                             adjoint_rtol, adjoint_atol)
    prep.backend.check(prep.config, adjoint)
    spec = prep.spec
    if len(prep.t_eval) == 1:
        # Nothing to integrate: y(t0) = y0 (its gradient is the identity; dL/dt0 = 0).
        return spec.unflatten_time(spec.flatten(y0).unsqueeze(0))
    flat_solve = prep.backend.solver(prep, adjoint, native_adjoint)
    try:
        if prep.t_grad:
            assert isinstance(t, torch.Tensor)  # t_grad: t is a tensor that requires grad
            ys = attach_time_gradients(prep.field(), t, spec.flatten(y0), flat_solve)
        else:
            ys = flat_solve(spec.flatten(y0))
    except Exception as e:
        if prep.defer_params:
            _check_deferred_params(func, spec, e)
        raise
    return spec.unflatten_time(ys)


def _check_deferred_params(func: Callable[..., Any], spec: StateSpec, error: Exception) -> None:
    """After a failed solve: raise the clear error for a parameter of ``func`` on another device
    or in another dtype than the state, if there is one (from ``error``, what the solve raised)."""
    try:
        params = unique_tensors(find_parameters(func))
    except Exception:  # noqa: BLE001 - an odd func must not hide the error the solve raised
        return
    try:
        check_params(params, spec.dtype, spec.device)
    except ValueError as bad:
        raise bad from error
