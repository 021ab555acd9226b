"""The front door: validate, pick the backend and the gradient method, solve."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence, Tuple, Union

import torch

from ._state import FlatRHS, StateSpec, find_parameters, unique_tensors
from ._time_grad import attach_time_gradients, make_field
from ._validate import (
    BACKENDS,
    check_params,
    check_state,
    check_time,
    default_adjoint_norm,
    make_config,
    step_callbacks,
)
from .sensitivity import Backprop, Problem, Sensitivity, resolve_sensitivity
from .solvers import TABLEAUX
from .solvers.compiled import CompiledStep
from .solvers.cuda_graph import check_cuda_graph, graphed_solve
from .stats import SolveStats

__all__ = ["odeint", "odeint_adjoint", "State"]


State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def odeint(func: Callable[[torch.Tensor, State], State], y0: State, t: torch.Tensor | Sequence[float], *,
           rtol: float = 1e-7, atol: float = 1e-9, method: str | None = None,
           options: dict[str, Any] | None = None, sensitivity: str | Sensitivity | None = None,
           stats: SolveStats | None = None, backend: str = "torch",
           adjoint_params: Iterable[torch.Tensor] | None = None, adjoint_rtol: float | None = None,
           adjoint_atol: float | None = None, adjoint_method: str | None = None,
           adjoint_options: dict[str, Any] | None = None,
           event_fn: Callable[[torch.Tensor, State], torch.Tensor] | None = None) -> State:
    """Solve ``dy/dt = func(t, y)`` from ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    Call shape is torchdiffeq's: switching is a change of the import line.

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` is a 0-d tensor of the state's dtype (or
            ``options["dtype"]``), ``y`` has ``y0``'s structure.
        y0: tensor of any shape ``S``, or a tuple of tensors (e.g. a CNF's ``(z, logp)``).
        t: 1-D tensor of ``T`` strictly increasing or decreasing times; ``t[0]`` is the start.
            If ``t`` requires grad, ``t.grad`` gets ``dL/dt_k = g_k . f(t_k, y_k)`` for ``k > 0``
            and ``dL/dt_0 = -(dL/dy_0 - g_0) . f(t_0, y_0)`` (torchdiffeq's convention: the
            derivative of the exact solution) with every gradient method and backend.
        rtol, atol: tolerances of adaptive methods.
        method: adaptive ``"dopri5"`` (default), ``"tsit5"``, ``"bosh3"``, ``"adaptive_heun"``,
            ``"dopri8"``, ``"fehlberg2"``; fixed-step explicit ``"euler"``, ``"midpoint"``,
            ``"heun2"``, ``"heun3"``, ``"rk4"``; fixed-step implicit (for stiff problems; stage
            equations solved by Newton's method) ``"implicit_euler"``, ``"implicit_midpoint"``,
            ``"trapezoid"``, ``"radauIIA3"``, ``"radauIIA5"``, ``"gl4"``, ``"gl6"``, ``"sdirk2"``,
            ``"trbdf2"``; fixed-step multistep ``"explicit_adams"``
            (Adams-Bashforth) and ``"implicit_adams"`` (= ``"fixed_adams"``, Adams-Bashforth-Moulton;
            its corrector iterates to ``rtol``/``atol``), both torchdiffeq's scheme (rk4 start,
            order ramping up to ``max_order``) with step-size-aware coefficients; ``"scipy_solver"``
            (scipy's ``solve_ivp`` solvers, forward only: use an adjoint ``sensitivity``).
        options: ``step_size`` or ``grid`` (fixed-step, also forces an adaptive tableau onto a grid),
            ``grid_constructor`` (``(func, y0, t) -> times``: any fixed grid from ``t[0]`` to
            ``t[-1]``; called again by each backward solve for its own interval),
            ``first_step``, ``max_step``, ``min_step`` (adaptive steps are never shorter, and a step
            that short is accepted whatever its error), ``max_num_steps`` (default 10000), ``dtype``
            (of ``t`` passed to ``func``; default the state's), ``safety``, ``ifactor``,
            ``dfactor``, ``beta`` (PI coefficient).
            ``norm``: the error norm, a function of the error estimate divided by
            ``atol + rtol * max(|y_n|, |y_n+1|)`` in ``y0``'s structure (a tensor, or a tuple)
            returning a 0-d tensor (default: RMS, the largest over a tuple's parts); a step is
            accepted when it is <= 1. In ``adjoint_options``: ``"seminorm"`` (leave the parameter
            integral out of the backward error control; cheaper, but the parameter gradient is then
            unchecked and can be wrong when its integrand is faster than the adjoint state's, e.g. a
            forcing term ``A sin(20 t)``), or a function of torchdiffeq's tuple ``(t, *y_parts,
            *adj_y_parts, *adj_params)`` (``t``'s part is 0 here: ``dL/dt_0`` is not integrated);
            the default is torchdiffeq's mixed norm (built from ``options["norm"]`` if given).
            ``step_t``: times the steps land on; ``jump_t``: the same, for times where ``func`` is
            discontinuous: the step ending there evaluates ``func`` just before the jump and the
            next one just after (never at it). ``perturb=True``: every step evaluates ``func``
            just inside its ends (the next representable time in ``t``'s dtype), never at a step
            boundary (torchdiffeq's option for fixed grids; here for every Runge-Kutta and Adams
            method). ``interp``: between step boundaries, ``"linear"`` or ``"cubic"`` (Hermite)
            interpolation instead of the method's own continuous extension (the default; cubic
            Hermite for methods without one).
            Step callbacks are read from ``func``, as torchdiffeq does:
            ``func.callback_step(t0, y0, dt)`` before every step attempt,
            ``callback_accept_step``/``callback_reject_step`` after an adaptive step's error test
            (``t0``/``dt`` 0-d tensors, ``y0`` in ``y0``'s structure), and their ``_adjoint``
            variants in backward solves (which pass the backward solve's flat state); a callback a
            method never calls gets torchdiffeq's warning.
            Adams: ``max_order`` (default 12; explicit_adams lowers it, for the rest of the
            solve, where its highest-order term outgrows the one below, as at Adams-Bashforth 11,
            unstable for real ``h lambda`` outside (-0.0034, 0)), ``max_iters`` (corrector,
            default 4). The fixed-step methods refuse a grid of more than ``max_num_steps`` steps
            (``SolverError``) before building it.
            scipy_solver: ``solver`` (``"RK45"``, ``"RK23"``, ``"DOP853"``, ``"Radau"``, ``"BDF"``,
            ``"LSODA"`` (default)), ``min_step`` (LSODA), ``first_step``, ``max_step``.
            Implicit methods also take ``newton_tol`` (Newton's stopping threshold relative to
            ``atol + rtol*|y|``; default ``max(10 eps / rtol, min(0.03, sqrt(rtol)))``),
            ``max_newton_iters`` (default 10) and ``jacobian`` (``"dense"``: ``df/dy`` from
            autograd, LU-factorised; ``"krylov"``: Jacobian-vector products and GMRES;
            ``"auto"``, the default: dense up to 64 state entries).
            Speed (explicit Runge-Kutta methods, torch backend): ``compile`` (``True`` or a dict
            of ``torch.compile`` keywords such as ``{"backend": "aot_eager"}``: each step - stage
            loop, combinations and ``func`` - runs as one compiled graph, compiled once per
            ``func`` and reused by later solves; see :mod:`pyode_bridge.solvers.compiled`),
            ``cuda_graph=True`` (CUDA, fixed grid, ``backprop``: the whole solve, forward and
            backward, captured as CUDA graphs and replayed; see
            :mod:`pyode_bridge.solvers.cuda_graph`).
        sensitivity: gradient method: ``"backprop"`` (the default on the torch backend),
            ``"checkpointed"``, ``"interpolated"``, ``"interpolating"``, ``"backsolve"`` or an
            instance (``pob.Interpolated(nodes=8)``). The julia backend offers ``"gauss"`` (its
            default), ``"interpolating"``, ``"backsolve"`` and ``"quadrature"``.
        stats: a :class:`SolveStats` reset and filled in place (NFE, steps; backward counters once
            ``.backward()`` has run).
        backend: ``"torch"`` (default) or ``"julia"`` (SciML; see the README).
        adjoint_params: tensors to return gradients for with memory-lean methods (default: the
            parameters of ``func`` if it is an ``nn.Module``, else the modules and tensors it
            captures). A tensor listed twice counts once. A listed tensor computed from another
            listed one (``w = 2 * p`` beside ``p``) is allowed: each gets its true total
            derivative, as with backprop (torchdiffeq counts ``p``'s share through ``w`` twice).
            A listed tensor that does not require grad is skipped, as in torchdiffeq.
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: backward-solve settings of
            the adjoint methods (default: the forward's), as in torchdiffeq.
        event_fn: ``event_fn(t, y) -> Tensor``: solve until it first reaches zero (any component,
            crossing or touching) instead of to ``t[-1]``, as torchdiffeq. ``t`` must then hold 2 times: ``t[0]`` the
            start, ``t[1]`` only the direction (the solve may run past it; ``max_num_steps`` caps
            it). The event time and state are differentiable (implicit function theorem) with
            every gradient method; see :func:`pyode_bridge.odeint_event`.

    Returns:
        Tensor of shape ``(T, *S)``, or a tuple of such for a tuple ``y0``. With ``event_fn``:
        ``(event_t, solution)``, ``event_t`` 0-d and ``solution`` of shape ``(2, *S)`` (the state at
        ``t[0]`` and at ``event_t``).

    Raises:
        ValueError: bad input (times, shapes, dtypes, devices, options), naming the fix.
        SolverError: the solve failed (NaN/Inf, step underflow, ``max_num_steps``, Newton's method
            of an implicit method not converging), with ``t``.
    """
    if event_fn is not None:
        from .events import odeint_until_event

        return odeint_until_event(func, y0, t, event_fn=event_fn, rtol=rtol, atol=atol, method=method,
                                  options=options, sensitivity=sensitivity, stats=stats, backend=backend,
                                  adjoint_params=adjoint_params, adjoint_rtol=adjoint_rtol,
                                  adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
                                  adjoint_options=adjoint_options)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {list(BACKENDS)}")
    if sensitivity is None:
        sensitivity = "backprop" if backend == "torch" else "gauss"
    check_state(y0)
    spec = StateSpec(y0)
    strategy = resolve_sensitivity(sensitivity) if backend == "torch" else sensitivity
    t_grad = torch.is_grad_enabled() and isinstance(t, torch.Tensor) and t.requires_grad
    t_eval = check_time(t, spec.dtype, spec.device)
    # func sees t in the state's dtype (as torchdiffeq); the solver's own time arithmetic is float64.
    time_dtype = spec.dtype
    julia_method = julia_adjoint_method = None
    if backend == "julia":
        # OrdinaryDiffEq names ("Vern7", "Rodas5P", ...) pass through; the backend validates them.
        if method is not None and method not in TABLEAUX:
            julia_method, method = method, None
        if adjoint_method is not None and adjoint_method not in TABLEAUX:
            julia_adjoint_method, adjoint_method = adjoint_method, None
    config = make_config(method, options, rtol, atol, time_dtype, spec=spec)
    if spec.is_tuple:
        config.norm_splits = tuple(spec.numels)
    config.callbacks = step_callbacks(func, spec, config)
    # backprop needs no list of func's parameters (autograd finds them; only cuda_graph reads them,
    # to tell whether a gradient is wanted), and walking a module on every solve costs as much as a
    # stage of a small field: their dtype and device are then checked only if the solve fails (to
    # name the cause instead of torch's low-level error).
    defer_params = (backend == "torch" and strategy.through_autograd and adjoint_params is None
                    and not config.cuda_graph)
    if defer_params:
        params = ()
    else:
        params = unique_tensors(adjoint_params if adjoint_params is not None else find_parameters(func))
        check_params(params, spec.dtype, spec.device)
        # A listed tensor that does not require grad has no gradient to receive (torchdiffeq drops it
        # too); kept, the backward would ask autograd for func's derivative with respect to it and fail.
        params = tuple(p for p in params if p.requires_grad)
    parts = tuple(y0) if spec.is_tuple else (y0,)
    grad_needed = torch.is_grad_enabled() and (t_grad or any(p.requires_grad for p in parts)
                                               or any(p.requires_grad for p in params))
    user_norm = (options or {}).get("norm")
    user_norm = user_norm if callable(user_norm) else None
    if backend == "julia" and (config.compile is not None or config.cuda_graph):
        raise ValueError("options['compile'] and options['cuda_graph'] speed up the torch backend's "
                         "Runge-Kutta steps; backend='julia' runs its own solver: drop them")
    backward_solves = backend != "torch" or strategy.solves_backward
    if adjoint_method is None and adjoint_options is None and not backward_solves:
        adjoint_config = config  # never read: this method solves nothing backwards
    elif adjoint_method is None and adjoint_options is None:
        # The forward's first_step belongs to t[0]; backward solves start from t[-1]. Its norm is
        # for the forward state: the adjoint methods build theirs (from it, as torchdiffeq does).
        adjoint_config = replace(config, first_step=None, norm=None)
    else:
        same = (adjoint_method or config.tableau.name) == config.tableau.name
        reused = {k: v for k, v in (options or {}).items() if k != "norm"} if same and options else None
        adjoint_config = make_config(adjoint_method or config.tableau.name,
                                     adjoint_options if adjoint_options is not None else reused,
                                     rtol, atol, time_dtype, spec=spec, adjoint=True)
    if adjoint_config is not config:
        if adjoint_config.adjoint_norm is None and user_norm is not None:
            adjoint_config.adjoint_norm = default_adjoint_norm(user_norm, spec, adjoint_config.seminorm)
        adjoint_config = replace(adjoint_config.with_tolerances(adjoint_rtol, adjoint_atol),
                                 norm_splits=config.norm_splits)  # the adjoint has the state's parts
    if backward_solves:
        # The methods with backward solves call the _adjoint callbacks (backprop/checkpointed never).
        adjoint_config.callbacks = step_callbacks(func, spec, adjoint_config, adjoint=True)
    if backend == "julia":
        _check_julia_options(config, adjoint_config)
    if stats is None:
        stats = SolveStats()
    stats.reset()

    if len(t_eval) == 1:
        # Nothing to integrate: y(t0) = y0 (its gradient is the identity; dL/dt0 = 0).
        return spec.unflatten_time(spec.flatten(y0).unsqueeze(0))

    if backend == "julia":
        from .backends.julia import odeint_julia

        def solve(y0_flat):
            out = odeint_julia(func, spec.unflatten(y0_flat), t, spec=spec, t_eval=t_eval, config=config,
                               adjoint_config=adjoint_config, sensitivity=sensitivity, params=params,
                               stats=stats, julia_method=julia_method,
                               julia_adjoint_method=julia_adjoint_method)
            return spec.flatten_time(out)
    else:
        rhs = FlatRHS(func, spec, config.time_dtype, config.tableau.name)
        if config.compile is not None:
            rhs.compiled = CompiledStep(func, spec, config.time_dtype, config.compile)
        prob = Problem(rhs=rhs, spec=spec, t_eval=t_eval, config=config,
                       adjoint_config=adjoint_config, params=params, stats=stats)
        if config.cuda_graph:
            check_cuda_graph(config, t_eval, spec.device, strategy.name)
        if not grad_needed and not strategy.through_autograd:
            # No gradient will be asked for: the plain solve is the cheapest forward for every method.
            strategy = Backprop()
        if strategy.through_autograd:
            prob = replace(prob, params=())

        def solve(y0_flat):
            if config.cuda_graph and grad_needed:  # graphs for training; a plain solve otherwise
                graphed = graphed_solve(func, spec, config, t_eval, y0_flat)
                ys = graphed.solve(y0_flat)
                stats.nfe_forward += graphed.nfe
                stats.steps_forward += graphed.steps
                return ys
            return strategy.solve(prob, y0_flat)

    try:
        if t_grad:
            field = make_field(func, spec, config.time_dtype, config.tableau.name)
            ys = attach_time_gradients(field, t, spec.flatten(y0), solve)
        else:
            ys = solve(spec.flatten(y0))
    except Exception as e:
        if defer_params:
            _check_deferred_params(func, spec, e)
        raise
    return spec.unflatten_time(ys)


def _check_deferred_params(func, spec: StateSpec, error: Exception) -> None:
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


def odeint_adjoint(func: Callable[[torch.Tensor, State], State], y0: State,
                   t: torch.Tensor | Sequence[float], *, sensitivity: str | Sensitivity = "backsolve",
                   **kwargs: Any) -> State:
    """torchdiffeq's ``odeint_adjoint``: :func:`odeint` with ``sensitivity="backsolve"`` by default.

    Accepts every keyword of :func:`odeint` (``adjoint_params``, ``adjoint_rtol``, ...). Pass
    ``sensitivity="interpolated"`` or ``"checkpointed"`` for the stable alternatives.

    Returns:
        Tensor of shape ``(T, *S)`` (``T = len(t)``, ``S = y0.shape``), or a tuple of such.
    """
    return odeint(func, y0, t, sensitivity=sensitivity, **kwargs)


def _check_julia_options(config, adjoint_config) -> None:
    """Refuse the torch loop's options that backend='julia' has no counterpart for (a silently
    ignored option would change the result without notice)."""
    bad = []
    for name, cfg in (("options", config), ("adjoint_options", adjoint_config)):
        for key, set_ in (("norm", cfg.norm is not None or cfg.adjoint_norm is not None),
                          ("perturb", cfg.perturb), ("grid_constructor", cfg.grid_constructor is not None),
                          ("step_t", bool(cfg.step_t)), ("jump_t", bool(cfg.jump_t)),
                          ("min_step", cfg.min_step > 0), ("interp", cfg.interp is not None)):
            if set_:
                bad.append(f"{name}[{key!r}]")
    if config.callbacks or adjoint_config.callbacks:
        bad.append("step callbacks on func (callback_step, ...)")
    if bad:
        raise ValueError(f"backend='julia' does not support {', '.join(dict.fromkeys(bad))}; use "
                         "backend='torch' for them")
