"""torchdiffeq's public API on pyode-bridge's engine: ``import pyode_bridge.torchdiffeq as torchdiffeq``.

This module mirrors torchdiffeq (its API at upstream commit 657943a, version 0.2.5) so that
switching is the import line alone: the same functions (:func:`odeint`, :func:`odeint_adjoint`,
:func:`odeint_event`, :func:`odeint_dense`), keyword names and defaults, option names and
defaults per method, the same warnings and errors where torchdiffeq's own tests check them, and
the same inspectable adjoint norm (``ys.grad_fn.adjoint_options["norm"]``). Every solve runs on
:func:`pyode_bridge.odeint` (one engine); :func:`odeint_adjoint` is its ``sensitivity="backsolve"``,
which is torchdiffeq's algorithm.

Where it differs from :func:`pyode_bridge.odeint`'s own defaults, it takes torchdiffeq's:

- no ``max_num_steps`` cap (``pyode_bridge.odeint`` stops at 10 000 steps);
- fixed-grid methods interpolate linearly between grid points (``options["interp"]="linear"``;
  ``pyode_bridge.odeint`` uses the method's continuous extension, cubic Hermite by default);
- an option torchdiffeq knows but the chosen solver does not take is dropped with torchdiffeq's
  "Unexpected arguments" warning (``pyode_bridge.odeint`` raises ``ValueError``); ``norm`` is
  dropped silently for fixed-grid and scipy methods, as torchdiffeq does;
- ``options["dtype"]`` (torchdiffeq: the precision of its time arithmetic) is ignored: time
  arithmetic is always float64 here and ``func`` sees ``t`` in the state's dtype, as in torchdiffeq.

What remains different is listed in the README ("Migrating from torchdiffeq"); anything left out
raises ``NotImplementedError`` saying why.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ._state import find_parameters
from ._validate import allowed_options, check_time
from .odeint import odeint as _odeint
from .odeint import odeint_event as _odeint_event
from .sensitivity import Backsolve
from .solvers import METHODS, ScipyMethod, SolverMethod

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense"]

__version__ = "0.2.5"  # the torchdiffeq API this module mirrors (upstream commit 657943a)

_NO_CAP = 2 ** 31 - 1  # torchdiffeq's max_num_steps: no practical cap

# odeint_adjoint's gradient guard (see Backsolve) gives its advice in this module's API, which has
# no sensitivity= argument.
_ADJOINT = Backsolve(remedy="Tighten rtol/atol (or adjoint_rtol/adjoint_atol; or the step_size), add "
                            "output times to t (z restarts from the forward's state at each), or "
                            "differentiate through the solver with odeint instead of odeint_adjoint "
                            "(exact for the computed solution; memory grows with the steps).")

# The options torchdiffeq's solvers take, by kind (their __init__ keywords at 657943a).
_TD_ADAPTIVE = {"norm", "min_step", "max_step", "first_step", "step_t", "jump_t", "safety", "ifactor",
                "dfactor", "max_num_steps", "dtype"}
_TD_FIXED = {"step_size", "grid_constructor", "interp", "perturb"}
_TD_ADAMS = _TD_FIXED | {"max_iters", "max_order", "implicit"}
_TD_IMPLICIT = _TD_FIXED | {"max_iters"}
_TD_SCIPY = {"min_step", "max_step", "solver"}
_TD_ALL = _TD_ADAPTIVE | _TD_ADAMS | _TD_SCIPY
# Keys a torchdiffeq solver pops without a warning.
_TD_SILENT = {"fixed": {"norm"}, "scipy": {"norm", "grid_points", "eps"}}


def _kind(method: str) -> str:
    tab = METHODS[method]
    if isinstance(tab, ScipyMethod):
        return "scipy"
    if isinstance(tab, SolverMethod):
        return "adams"
    if getattr(tab, "implicit", False):
        return "implicit"
    return "adaptive" if tab.adaptive else "fixed"


def _options(method, options, *, adjoint_norm=None):
    """``(method, options)`` for :func:`pyode_bridge.odeint` with torchdiffeq's per-method
    semantics and defaults (see the module docstring). ``adjoint_norm``: the backward norm to
    install (adaptive methods only: torchdiffeq's fixed-grid and scipy solvers ignore norms)."""
    method = "dopri5" if method is None else method
    opts = dict(options or {})
    if method not in METHODS:
        return method, opts  # pyode_bridge.odeint names the valid methods
    kind = _kind(method)
    if kind == "adams" and "implicit" in opts:
        # torchdiffeq's AdamsBashforthMoulton(implicit=False) is explicit_adams.
        method = "implicit_adams" if opts.pop("implicit") else "explicit_adams"
    if kind == "implicit" and "max_iters" in opts:
        opts["max_newton_iters"] = opts.pop("max_iters")
    td_known = {"adaptive": _TD_ADAPTIVE, "fixed": _TD_FIXED, "adams": _TD_ADAMS, "implicit": _TD_IMPLICIT,
                "scipy": _TD_SCIPY}[kind]
    silent = _TD_SILENT.get("fixed" if kind in ("fixed", "adams", "implicit") else kind, set())
    opts.pop("dtype", None)  # time arithmetic is float64 here (torchdiffeq's default precision)
    for key in silent:
        opts.pop(key, None)
    if kind == "scipy" and "min_step" in opts and opts.get("solver", "LSODA") != "LSODA":
        warnings.warn("The following arguments have no effect for a chosen solver: min_step.", stacklevel=3)
        del opts["min_step"]
    ours = allowed_options(method)
    unexpected = {k: v for k, v in opts.items() if (k in _TD_ALL and k not in td_known) or k not in ours}
    if unexpected:
        warnings.warn(f"{method}: Unexpected arguments {unexpected}", stacklevel=3)
        for k in unexpected:
            del opts[k]
    opts.setdefault("max_num_steps", _NO_CAP)
    if kind in ("fixed", "adams", "implicit"):
        opts.setdefault("interp", "linear")
    if adjoint_norm is not None and kind == "adaptive":
        opts["norm"] = adjoint_norm
    return method, opts


def _tolerance(name, tol, y0):
    """torchdiffeq's tolerance forms: a number, a one-element tensor, or (tuple ``y0``) one per part."""
    if isinstance(tol, (tuple, list)):
        values = {float(torch.as_tensor(x)) for x in tol}
        if len(values) > 1:
            raise NotImplementedError(
                f"per-part {name} (one tolerance per part of a tuple y0) is not supported: the error "
                f"control uses one {name} for the whole state; pass one number (the smallest), or "
                "rescale the parts so that one tolerance suits them all")
        return values.pop()
    if isinstance(tol, torch.Tensor) and tol.numel() > 1:
        raise NotImplementedError(f"per-component {name} is not supported: pass one number")
    return tol


def _refuse_complex(y0):
    parts = y0 if isinstance(y0, tuple) else (y0,)
    if any(isinstance(p, torch.Tensor) and p.is_complex() for p in parts):
        raise NotImplementedError(
            "complex states are not supported: the solvers' error control and dense output work on "
            "real tensors; pass torch.view_as_real(y0) (real and imaginary parts in a last dimension "
            "of size 2) and let func work on that, returning torch.view_as_real of its derivative")


def _time_on_device(t, y0):
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        # torchdiffeq has no per-sample t; pyode_bridge.odeint would otherwise solve it per sample.
        check_time(t, t.dtype, t.device)
    ref = y0[0] if isinstance(y0, tuple) else y0
    if isinstance(t, torch.Tensor) and isinstance(ref, torch.Tensor) and t.device != ref.device:
        warnings.warn("t is not on the same device as y0. Coercing to y0.device.", stacklevel=3)
        t = t.to(ref.device)
    return t


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """torchdiffeq's ``odeint``: solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0``, at every time in ``t``.

    Gradients flow by autograd through the solver's operations (:func:`pyode_bridge.odeint`'s
    ``sensitivity="backprop"``); gradients with respect to ``t`` follow torchdiffeq's convention.

    Args:
        func: ``func(t, y) -> dy/dt``; ``t`` is a 0-d tensor of the state's dtype. Step callbacks
            ``func.callback_step(t0, y0, dt)`` (every method but scipy_solver) and
            ``callback_accept_step``/``callback_reject_step`` (adaptive methods) are called.
        y0: tensor of shape ``S`` or a tuple of tensors.
        t: 1-D tensor of ``T`` strictly increasing or decreasing times.
        rtol, atol: tolerances (a number; a tuple of equal numbers for a tuple ``y0``).
        method: torchdiffeq's names (default ``"dopri5"``).
        options: torchdiffeq's options of that method (``norm``, ``step_t``, ``jump_t``,
            ``min_step``, ``max_step``, ``first_step``, ``step_size``, ``grid_constructor``,
            ``perturb``, ``interp``, ...).
        event_fn: ``event_fn(t, y) -> Tensor``: solve until it first reaches zero; ``t`` must hold two
            times. Returns ``(event_t, solution)`` then.

    Returns:
        Tensor ``(T, *S)`` (a tuple of such for a tuple ``y0``), or ``(event_t, solution (2, *S))``
        with ``event_fn``.
    """
    _refuse_complex(y0)
    method, opts = _options(method, options)
    t = _time_on_device(t, y0)
    kwargs = dict(rtol=_tolerance("rtol", rtol, y0), atol=_tolerance("atol", atol, y0), method=method,
                  options=opts, sensitivity="backprop")
    if event_fn is not None:
        return _odeint(func, y0, t, event_fn=event_fn, **kwargs)
    return _odeint(func, y0, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# odeint_adjoint: torchdiffeq's adjoint norm (the dict it exposes on grad_fn) over backsolve.
# ---------------------------------------------------------------------------------------------

def _rms_norm(tensor):
    return tensor.abs().pow(2).mean().sqrt()


def _mixed_norm(tensor_tuple):
    if len(tensor_tuple) == 0:
        return 0.
    return max([_rms_norm(tensor) for tensor in tensor_tuple])


def _flat_to_shape(tensor, length, shapes):
    out, total = [], 0
    for shape in shapes:
        nxt = total + shape.numel()
        # view((...)), not view(...): with length=() and shape=() the latter fails.
        out.append(tensor[..., total:nxt].view((*length, *shape)))
        total = nxt
    return tuple(out)


def _handle_adjoint_norm(adjoint_options, shapes, state_norm):
    """torchdiffeq's ``handle_adjoint_norm_``: put the backward solve's norm into
    ``adjoint_options["norm"]`` (in place), in torchdiffeq's internal form: called with
    ``(t, y, adj_y, *adj_params)`` where ``y``/``adj_y`` have ``y0``'s shape, or are flat for a
    tuple ``y0``."""

    def default_adjoint_norm(tensor_tuple):
        t, y, adj_y, *adj_params = tensor_tuple
        return max(t.abs(), state_norm(y), state_norm(adj_y), _mixed_norm(adj_params))

    if "norm" not in adjoint_options:
        adjoint_options["norm"] = default_adjoint_norm
        return
    adjoint_norm = adjoint_options["norm"]
    if isinstance(adjoint_norm, str) and adjoint_norm == "seminorm":
        def adjoint_seminorm(tensor_tuple):
            t, y, adj_y, *adj_params = tensor_tuple
            return max(t.abs(), state_norm(y), state_norm(adj_y))
        adjoint_options["norm"] = adjoint_seminorm
    elif shapes is not None:
        # The user's norm sees the tuple structure: (t, *y_parts, *adj_y_parts, *adj_params).
        def _adjoint_norm(tensor_tuple):
            t, y, adj_y, *adj_params = tensor_tuple
            y = _flat_to_shape(y, (), shapes)
            adj_y = _flat_to_shape(adj_y, (), shapes)
            return adjoint_norm((t, *y, *adj_y, *adj_params))
        adjoint_options["norm"] = _adjoint_norm


class _AdjointOutput(torch.autograd.Function):
    """Identity on the solution whose node carries ``adjoint_options`` (torchdiffeq's
    ``ys.grad_fn.adjoint_options``); the backward solve reads its ``"norm"`` when it runs, so a
    norm replaced there after the forward is the one used."""

    @staticmethod
    def forward(ctx, adjoint_options, ys):
        ctx.adjoint_options = adjoint_options
        return ys.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _bridge_norm(holder, shapes):
    """The backward norm for :func:`pyode_bridge.odeint` (``(t, *y_parts, *adj_parts, *params)``)
    calling ``holder["norm"]`` (looked up at each call) in torchdiffeq's internal form."""
    k = 1 if shapes is None else len(shapes)

    def norm(tensors):
        t, y, adj, params = tensors[0], tensors[1:1 + k], tensors[1 + k:1 + 2 * k], tensors[1 + 2 * k:]
        if shapes is None:
            y, adj = y[0], adj[0]
        else:
            y = torch.cat([p.reshape(-1) for p in y])
            adj = torch.cat([p.reshape(-1) for p in adj])
        return holder["norm"]((t, y, adj, *params))

    return norm


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None,
                   adjoint_rtol=None, adjoint_atol=None, adjoint_method=None, adjoint_options=None,
                   adjoint_params=None):
    """torchdiffeq's ``odeint_adjoint``: :func:`odeint` whose gradient comes from solving the
    adjoint system backwards (``sensitivity="backsolve"``), with O(1) memory in the steps.

    Args:
        func, y0, t, rtol, atol, method, options, event_fn: as :func:`odeint`.
        adjoint_rtol, adjoint_atol, adjoint_method: of the backward solve (default the forward's).
        adjoint_options: options of the backward solve (default ``options`` without ``norm``;
            required when ``adjoint_method`` differs from ``method`` and ``options`` is given).
            ``norm``: ``"seminorm"`` (leave the parameter gradients out of the error control) or
            a function of torchdiffeq's tuple ``(t, *y, *adj_y, *adj_params)``; the default is
            torchdiffeq's mixed norm over that tuple. The norm in use is
            ``ys.grad_fn.adjoint_options["norm"]`` (for a tuple ``y0``: on the node two levels
            below each part, as in torchdiffeq).
        adjoint_params: tensors to differentiate besides ``y0`` (default ``func.parameters()`` for
            a module, else the tensors and modules ``func`` captures); those not requiring grad
            are left out. A tensor computed from another listed one may be listed beside it
            (torchcde lists a spline's coefficients with the times they came from): each gets its
            true total derivative, what ``odeint`` gives. torchdiffeq counts the share that reaches
            ``p`` through ``w`` twice (``adjoint_params=(2 * p, p)``: twice ``dL/dp``).

    Returns:
        As :func:`odeint`.
    """
    _refuse_complex(y0)
    if adjoint_rtol is None:
        adjoint_rtol = rtol
    if adjoint_atol is None:
        adjoint_atol = atol
    if adjoint_method is None:
        adjoint_method = method
    if adjoint_method != method and options is not None and adjoint_options is None:
        raise ValueError("If `adjoint_method != method` then we cannot infer `adjoint_options` from "
                         "`options`. So as `options` has been passed then `adjoint_options` must be "
                         "passed as well.")
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in options.items() if k != "norm"} if options is not None else {}
    else:
        adjoint_options = dict(adjoint_options)  # never modify the caller's dict
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, nn.Module) else tuple(find_parameters(func))
    else:
        adjoint_params = tuple(adjoint_params)
    n_given = len(adjoint_params)
    adjoint_params = tuple(p for p in adjoint_params if p.requires_grad)
    if len(adjoint_params) != n_given and callable(adjoint_options.get("norm")):
        warnings.warn("An adjoint parameter was passed without requiring gradient. For efficiency this "
                      "will be excluded from the adjoint pass, and will not appear as a tensor in the "
                      "adjoint norm.", stacklevel=2)

    is_tuple = isinstance(y0, tuple)
    shapes = [p.shape for p in y0] if is_tuple else None
    user_norm = (options or {}).get("norm")
    if is_tuple:
        base = user_norm if user_norm is not None else _mixed_norm

        def state_norm(flat):
            return base(_flat_to_shape(flat, (), shapes))
    else:
        state_norm = user_norm if user_norm is not None else _rms_norm
    _handle_adjoint_norm(adjoint_options, shapes, state_norm)
    holder = adjoint_options  # what grad_fn.adjoint_options exposes; read by the backward solve

    fwd_method, fwd_opts = _options(method, options)
    adj_method, adj_opts = _options(adjoint_method, {k: v for k, v in adjoint_options.items() if k != "norm"},
                                    adjoint_norm=_bridge_norm(holder, shapes))
    t = _time_on_device(t, y0)
    kwargs = dict(rtol=_tolerance("rtol", rtol, y0), atol=_tolerance("atol", atol, y0), method=fwd_method,
                  options=fwd_opts, sensitivity=_ADJOINT, adjoint_params=adjoint_params,
                  adjoint_rtol=_tolerance("adjoint_rtol", adjoint_rtol, y0),
                  adjoint_atol=_tolerance("adjoint_atol", adjoint_atol, y0), adjoint_method=adj_method,
                  adjoint_options=adj_opts)
    if event_fn is not None:
        return _odeint(func, y0, t, event_fn=event_fn, **kwargs)
    ys = _odeint(func, y0, t, **kwargs)
    if not is_tuple:
        return _AdjointOutput.apply(holder, ys)
    T = ys[0].shape[0]
    flat = _AdjointOutput.apply(holder, torch.cat([p.reshape(T, -1) for p in ys], dim=1))
    return _flat_to_shape(flat, (T,), shapes)


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """torchdiffeq's ``odeint_event``: solve from ``t0`` until ``event_fn(t, y)`` crosses zero.

    Returns ``(event_t, solution)`` with ``solution`` of shape ``(2, *S)`` (the state at ``t0`` and
    at the event); both are differentiable (implicit function theorem). ``odeint_interface`` is
    :func:`odeint` (default) or :func:`odeint_adjoint`; ``kwargs`` go to it. ``t0``: one time
    (torchdiffeq's ``odeint_event`` has no per-row starts: see :func:`pyode_bridge.odeint_event`).
    """
    if isinstance(t0, torch.Tensor) and t0.numel() != 1:
        # torchdiffeq concatenates such a t0 into a t of 2 B times and refuses it (len(t) == 2); here
        # it would reach odeint as a (B, 2) t, whose refusal would not name t0.
        raise ValueError(f"t0 must hold a single time in torchdiffeq's odeint_event, got shape {tuple(t0.shape)} "
                         "(torchdiffeq: 'We require len(t) == 2 when in event handling mode'); for each batch "
                         "row its own start and event (per-sample events), call pyode_bridge.odeint_event(func, "
                         "y0, t0, event_fn=...) with t0 of shape (B,)")
    return _odeint_event(func, y0, t0, event_fn=event_fn, reverse_time=reverse_time,
                         odeint_interface=odeint_interface, **kwargs)


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """torchdiffeq's ``odeint_dense``: solve from ``t0`` to ``t1`` and return the dense solution.

    Returns ``dense_output_fn(t_eval)``: the state at ``t_eval`` (a 0-d tensor: shape ``S``; a 1-D
    tensor of ``K`` times: ``(K, *S)``) between ``t0`` and ``t1``, read from the solver's
    continuous extension and differentiable like :func:`odeint`'s result. torchdiffeq allows only
    ``method="dopri5"`` and a tensor ``y0``; any method and a tuple ``y0`` work here.
    """
    from ._state import FlatRHS, StateSpec
    from ._validate import check_state, make_config
    from .solvers import DenseSolution, integrate

    method, opts = _options(method, options)
    check_state(y0)
    spec = StateSpec(y0)
    t_pair = [float(t0), float(t1)]
    if t_pair[0] == t_pair[1]:
        raise ValueError(f"odeint_dense needs t0 != t1, got t0 = t1 = {t_pair[0]}")
    config = make_config(method, opts, _tolerance("rtol", rtol, y0), _tolerance("atol", atol, y0),
                         spec.dtype, spec=spec)
    rhs = FlatRHS(func, spec, config.time.dtype, config.method.name)
    dense = DenseSolution()
    integrate(rhs, spec.flatten(y0), t_pair, config, on_step=dense.append)
    lo, hi = min(t_pair), max(t_pair)

    def dense_output_fn(t_eval):
        ts = torch.as_tensor(t_eval)
        values = [float(x) for x in ts.detach().reshape(-1).cpu().tolist()]
        bad = [x for x in values if not lo <= x <= hi]
        if bad:
            raise ValueError(f"odeint_dense's solution covers [{lo}, {hi}]; t_eval={bad[0]} is outside")
        out = torch.stack([dense.evaluate(x) for x in values])
        if ts.dim() == 0:
            return spec.unflatten(out[0])
        return spec.unflatten_time(out)

    return dense_output_fn
