"""The front door: :func:`odeint` and its variants, which check and prepare the problem
(:mod:`pyode_bridge._problem`) and hand it to a backend or to the event search."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from ._per_sample import requested, solve_per_sample
from ._per_sample_events import odeint_event_per_sample
from ._problem import solve
from ._state import State
from .events import odeint_until_event
from .sensitivity import Sensitivity
from .stats import SolveStats

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "State"]


def odeint(func: Callable[[torch.Tensor, State], State], y0: State, t: torch.Tensor | Sequence[float], *,
           rtol: float = 1e-7, atol: float = 1e-9, method: str | None = None,
           options: dict[str, Any] | None = None, sensitivity: str | Sensitivity | None = None,
           stats: SolveStats | None = None, backend: str = "torch",
           adjoint_params: Iterable[torch.Tensor] | None = None, adjoint_rtol: float | None = None,
           adjoint_atol: float | None = None, adjoint_method: str | None = None,
           adjoint_options: dict[str, Any] | None = None,
           event_fn: Callable[[torch.Tensor, State], torch.Tensor] | None = None
           ) -> State | tuple[torch.Tensor, State]:
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
            ``dfactor``, ``beta`` (PI coefficient; default 0: integral control).
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
            every gradient method; see :func:`pyode_bridge.odeint_event`. Per-sample mode (``t``
            of shape ``(B, 2)``, or ``options["step_control"]="per_sample"``): each row its own
            event (``event_fn`` gets ``t`` of shape ``(B,)`` and returns ``(B,)`` or ``(B, K...)``).

    Returns:
        Tensor of shape ``(T, *S)``, or a tuple of such for a tuple ``y0``. With ``event_fn``:
        ``(event_t, solution)``, ``event_t`` 0-d and ``solution`` of shape ``(2, *S)`` (the state at
        ``t[0]`` and at ``event_t``); per-sample: ``event_t`` of shape ``(B,)``, ``solution[:, b]``
        row ``b``'s states at its start and its event.

    Raises:
        ValueError: bad input (times, shapes, dtypes, devices, options), naming the fix.
        SolverError: the solve failed (NaN/Inf, step underflow, ``max_num_steps``, Newton's method
            of an implicit method not converging), with ``t``.
    """
    settings: dict[str, Any] = dict(rtol=rtol, atol=atol, method=method, options=options, sensitivity=sensitivity,
                                    stats=stats, backend=backend, adjoint_params=adjoint_params,
                                    adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol)
    if requested(t, options):
        if adjoint_method is not None or adjoint_options is not None:
            uses = "adjoints use" if event_fn is not None else "backsolve uses"
            raise ValueError("adjoint_method/adjoint_options are not supported in per-sample mode yet "
                             f"(its {uses} the forward's method and options, with adjoint_rtol/"
                             "adjoint_atol); drop them")
        if event_fn is not None:
            return odeint_event_per_sample(func, y0, t, event_fn=event_fn, **settings)
        return solve_per_sample(func, y0, t, **settings)
    if event_fn is not None:
        return odeint_until_event(func, y0, t, event_fn=event_fn, adjoint_method=adjoint_method,
                                  adjoint_options=adjoint_options, **settings)
    return solve(func, y0, t, adjoint_method=adjoint_method, adjoint_options=adjoint_options, **settings)


def odeint_adjoint(func: Callable[[torch.Tensor, State], State], y0: State,
                   t: torch.Tensor | Sequence[float], *, sensitivity: str | Sensitivity = "backsolve",
                   **kwargs: Any) -> State | tuple[torch.Tensor, State]:
    """torchdiffeq's ``odeint_adjoint``: :func:`odeint` with ``sensitivity="backsolve"`` by default.

    Accepts every keyword of :func:`odeint` (``adjoint_params``, ``adjoint_rtol``, ...). Pass
    ``sensitivity="interpolated"`` or ``"checkpointed"`` for the stable alternatives.

    Returns:
        Tensor of shape ``(T, *S)`` (``T = len(t)``, ``S = y0.shape``), or a tuple of such.
    """
    return odeint(func, y0, t, sensitivity=sensitivity, **kwargs)


def odeint_event(func: Callable[[torch.Tensor, State], State], y0: State, t0: torch.Tensor | float, *,
                 event_fn: Callable[[torch.Tensor, State], torch.Tensor], reverse_time: bool = False,
                 odeint_interface: Callable[..., Any] | None = None, **kwargs: Any) -> tuple[torch.Tensor, State]:
    """Solve ``dy/dt = func(t, y)`` from ``y(t0) = y0`` until ``event_fn(t, y)`` reaches zero.

    torchdiffeq's ``odeint_event``: the solve starts at ``t0`` and runs forward (backward with
    ``reverse_time=True``) until any component of ``event_fn`` first reaches zero, found to
    float64 resolution in time on the solver's dense output. The event time and state are
    differentiable with respect to ``y0``, ``t0`` and the tensors ``func`` and ``event_fn`` use.

    Args:
        func: ``func(t, y) -> dy/dt`` as for :func:`~pyode_bridge.odeint`.
        y0: tensor of any shape ``S``, or a tuple of tensors.
        t0: start time: a number or a one-element tensor (it may require grad); or a tensor of
            shape ``(B,)``, each batch row's own start, which solves in per-sample mode (as does
            ``options={"step_control": "per_sample"}`` with a single ``t0``): every row stepping on
            its own until its own event.
        event_fn: ``event_fn(t, y) -> Tensor`` of any shape ``(K...)``; ``t`` is a 0-d tensor (the
            state's dtype), ``y`` has ``y0``'s structure. Per-sample mode: ``t`` has shape ``(B,)``
            and ``event_fn`` returns shape ``(B,)`` or ``(B, K...)``, row ``b`` sample ``b``'s
            components (its event: the first time one of them reaches zero). The event is the first time any component
            reaches zero (crossing it, or touching it, to round-off, without a sign change) from
            its sign at ``t0``. A component exactly zero at ``t0`` is an event at ``t0`` (as
            torchdiffeq: start just off the surface, e.g. after a bounce). Each step is screened
            at 6 equal intervals where event_fn may come near zero inside it: a dip narrower than
            that (and not seen at the step's middle) can be missed; ``options["max_step"]`` bounds it.
        reverse_time: integrate towards decreasing ``t``.
        odeint_interface: the solver to call: :func:`pyode_bridge.odeint` (default),
            :func:`pyode_bridge.odeint_adjoint`, or a callable with their signature that handles
            ``event_fn=`` (e.g. ``pyode_bridge.torchdiffeq.odeint``).
        **kwargs: passed on (``rtol``, ``atol``, ``method``, ``options``, ``sensitivity``,
            ``stats``, ``adjoint_params``, ...). ``options["max_num_steps"]`` caps the search.

    Returns:
        ``(event_t, solution)``: ``event_t`` a 0-d tensor (``t0``'s dtype), ``solution`` of shape
        ``(2, *S)`` (or a tuple of such): the state at ``t0`` and at ``event_t``. Per-sample mode:
        ``event_t`` of shape ``(B,)``, ``solution[:, b]`` row ``b``'s state at its ``t0`` and its
        event (with ``options={"on_failure": "mask"}``, NaN event time and state for a row that
        failed; ``stats.sample_status`` says why). See ``docs/per_sample.md``.

    Raises:
        SolverError: no event within ``max_num_steps`` accepted steps (the message names the fix);
            at backward time, an event that crosses zero tangentially (no gradient exists).
        ValueError: bad input, as for :func:`~pyode_bridge.odeint`.
    """
    solve: Callable[..., Any] = odeint if odeint_interface is None else odeint_interface
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    ref = parts[0] if parts and isinstance(parts[0], torch.Tensor) else None
    if not isinstance(t0, torch.Tensor):
        try:
            t0 = torch.tensor(float(t0), dtype=ref.dtype if ref is not None else None,
                              device=ref.device if ref is not None else None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"t0 must be a number or a one-element tensor, got {type(t0).__name__}; "
                             "pass e.g. torch.tensor(0.0)") from e
    # Each row its own start: a (B,) t0 (a (1,) one only when per-sample mode is asked for, so that
    # a one-element t0 keeps meaning a single time).
    per_row = t0.dim() == 1 and (t0.numel() > 1 or requested(None, kwargs.get("options")))
    if not per_row and t0.numel() != 1:
        raise ValueError(f"t0 must be a single time (a number or a one-element tensor) or, for per-sample "
                         f"events, one time per batch row (shape (B,)), got shape {tuple(t0.shape)}")
    if not per_row:
        t0 = t0.reshape(())
    elif ref is not None and (ref.dim() == 0 or ref.shape[0] != t0.shape[0]):
        lead = ref.shape[0] if ref.dim() else "absent (0-d y0)"
        raise ValueError(f"t0 has shape {tuple(t0.shape)}: one start time per batch row (per-sample events), "
                         f"but y0's leading dimension is {lead}; pass a single time (a number or a one-element "
                         "tensor) for a shared start, or one per row of y0")
    # As torchdiffeq: t[1] only sets the direction; the solve runs until the event.
    t1 = t0.detach() - 1.0 if reverse_time else t0.detach() + 1.0
    t = torch.stack([t0, t1], -1)
    return solve(func, y0, t, event_fn=event_fn, **kwargs)
