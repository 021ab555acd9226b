"""Input validation for :func:`pyode_bridge.odeint`: every bad input gets a ValueError that names
the problem and the fix."""
from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from ._state import StateSpec, _dtype_hint
from .errors import SolverError
from .solvers import METHODS, ButcherTableau, ScipyMethod, SolverConfig, SolverMethod
from .solvers.boundaries import StepCallbacks
from .solvers.compiled import compile_settings
from .solvers.config import AccelOptions, ControlOptions, NewtonOptions, TimeOptions
from .solvers.loop import all_finite

__all__ = ["check_state", "check_time", "make_config", "check_params", "allowed_options", "StateNorm",
           "default_adjoint_norm", "step_callbacks", "CALLBACK_NAMES", "STEP_CONTROLS", "ON_FAILURE",
           "per_sample_options", "check_sample_times", "check_sample_stops", "check_per_sample_func"]

_FLOATS = (torch.float32, torch.float64)
_FIXED_OPTIONS = {"step_size", "grid", "max_num_steps", "dtype", "grid_constructor", "perturb", "interp",
                  "step_t", "jump_t", "compile", "cuda_graph"}
_ADAPTIVE_OPTIONS = _FIXED_OPTIONS | {"first_step", "max_step", "safety", "ifactor", "dfactor", "beta",
                                      "norm", "min_step"}
# scipy chooses its own steps with its own controller: no grid, no PI coefficients.
_SCIPY_OPTIONS = {"max_num_steps", "dtype", "first_step", "max_step"}
_NEWTON_OPTIONS = {"newton_tol", "max_newton_iters", "jacobian"}  # implicit methods only


def check_state(y0):
    """``y0`` must be a floating tensor or a non-empty tuple of them, on one device, one dtype."""
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not parts:
        raise ValueError("y0 is an empty tuple; pass the initial state: a tensor such as torch.zeros(n), "
                         "or a tuple of tensors")
    for i, p in enumerate(parts):
        name = f"y0[{i}]" if isinstance(y0, (tuple, list)) else "y0"
        if not isinstance(p, torch.Tensor):
            raise ValueError(_not_a_tensor(y0, name, p))
        _no_meta(name, p)
        if p.is_complex():
            raise ValueError(f"{name} has dtype {p.dtype}; pyode-bridge solves real states in float32 or "
                             f"float64: pass torch.view_as_real({name}) (real and imaginary parts in a last "
                             "dimension of size 2) and let func work on that")
        if p.dtype not in _FLOATS:
            raise ValueError(f"{name} has dtype {p.dtype}; pyode-bridge solves in float32 or "
                             f"float64: convert with {name}.float() or {name}.double()")
        if p.dtype != parts[0].dtype:
            wide = ".double()" if torch.float64 in (p.dtype, parts[0].dtype) else ".float()"
            raise ValueError(f"the parts of y0 have different dtypes ({parts[0].dtype} and {p.dtype} "
                             f"at index {i}); convert them to one dtype, e.g. "
                             f"y0 = tuple(p{wide} for p in y0)")
        if p.device != parts[0].device:
            raise ValueError(f"the parts of y0 are on different devices ({parts[0].device} and "
                             f"{p.device} at index {i}); move them to one device with .to(device)")
        if p.numel() == 0:
            if isinstance(y0, (tuple, list)):
                raise ValueError(f"{name} is empty (shape {tuple(p.shape)}); every part of a tuple state "
                                 f"needs at least one entry: leave that part out of y0 and out of what "
                                 "func returns")
            raise ValueError(f"y0 is empty (shape {tuple(p.shape)}); the state needs at least one entry, "
                             "e.g. torch.zeros(n) with n >= 1")
    bad = [i for i, p in enumerate(parts) if not all_finite(p)]
    if bad:
        name = f"y0[{bad[0]}]" if isinstance(y0, (tuple, list)) else "y0"
        if isinstance(y0, (tuple, list)):
            where = f"in part(s) {', '.join(f'y0[{i}]' for i in bad)}"
        else:
            with torch.no_grad():
                idx = (~torch.isfinite(y0)).nonzero()
            where = f"at {len(idx)} entr{'y' if len(idx) == 1 else 'ies'}, the first at index {tuple(idx[0].tolist())}"
        raise ValueError(f"y0 contains NaN or Inf ({where}); the initial state must be finite: check "
                         f"where y0 comes from (torch.isfinite({name}) marks the bad entries)")


def _no_meta(name: str, x: torch.Tensor) -> None:
    """A meta tensor has a shape but no values: a solve needs the values."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values, e.g. made under "
                         f"torch.device('meta')); a solve needs values: create {name} on a real device "
                         "(e.g. device='cpu' or 'cuda')")


def _not_a_tensor(y0, name: str, part) -> str:
    """The message for a state (part) that is not a tensor, with the conversion that fixes it."""
    kind = type(part).__name__
    if isinstance(y0, (tuple, list)) and all(isinstance(x, (int, float)) for x in y0):
        return (f"y0 must be a torch.Tensor or a tuple of tensors, got a {type(y0).__name__} of "
                "numbers; pass one tensor: torch.tensor(y0, dtype=torch.float32) (or torch.float64)")
    if isinstance(part, (int, float)):
        return f"{name} must be a torch.Tensor, got {kind}; wrap it: torch.tensor([{float(part)!r}])"
    if hasattr(part, "__array__"):
        return (f"{name} must be a torch.Tensor, got {kind}; convert it with "
                f"torch.as_tensor({name}, dtype=torch.float32) (or torch.float64)")
    return f"{name} must be a torch.Tensor, got {kind}; pass the initial state as a floating tensor"


def check_time(t, dtype, device) -> list:
    """``t`` must be 1-D, finite, strictly monotone, on ``device``. Returns it as Python floats."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(f"t must be a 1-D tensor of times, got {type(t).__name__}; pass e.g. "
                             "torch.linspace(0.0, 1.0, 10) or [0.0, 1.0]") from e
        t = t.to(device)
    _no_meta("t", t)
    if t.dim() != 1:
        raise ValueError(_not_1d(t))
    if not t.is_floating_point():
        raise ValueError(f"t has dtype {t.dtype}; pass floating-point times, e.g. t.float()")
    if t.device != device:
        raise ValueError(f"t is on {t.device} but y0 is on {device}; move t with t.to(y0.device)")
    if t.numel() == 0:
        raise ValueError("t is empty; pass at least the start and end times, e.g. "
                         "torch.tensor([0.0, 1.0])")
    ts = [float(x) for x in t.detach().cpu().tolist()]
    if len(ts) >= 2 and all(map(math.isfinite, ts)) and (all(map(operator.lt, ts, ts[1:])) or
                                                         all(map(operator.gt, ts, ts[1:]))):
        return ts  # the common case, checked at C speed (many output times)
    if any(math.isnan(x) for x in ts):
        raise ValueError(f"t contains NaN at index {[i for i, x in enumerate(ts) if math.isnan(x)]}; "
                         "integration times must be finite numbers")
    if any(math.isinf(x) for x in ts):
        raise ValueError(f"t contains Inf at index {[i for i, x in enumerate(ts) if math.isinf(x)]}; "
                         "integration times must be finite: integrate to a large finite time instead")
    if len(ts) >= 2:
        _check_monotone(ts)
    return ts


def _not_1d(t: torch.Tensor) -> str:
    """The message for a ``t`` that is not 1-D, with the reshape that fixes it where one does."""
    shape = tuple(t.shape)
    if t.dim() == 0:
        return ("t must be a 1-D tensor of times, got a 0-d tensor; pass the start and end times, "
                "e.g. torch.tensor([0.0, 1.0])")
    if sum(n > 1 for n in shape) <= 1:
        per_sample = (" (a per-sample t of shape (B, T) needs T >= 2 times per row)"
                      if t.dim() == 2 and shape[1] == 1 and shape[0] > 1 else "")
        return f"t must be a 1-D tensor of times, got shape {shape}; flatten it with t.reshape(-1){per_sample}"
    return (f"t must be a 1-D tensor of times, got shape {shape}; one solve takes one time grid: "
            "solve once per grid, or pass the union of the grids (sorted, without repeats)")


def _check_monotone(ts: list) -> None:
    """Times must all increase or all decrease (the direction of ``t[0] -> t[1]``), with no repeat."""
    for i, (a, b) in enumerate(zip(ts, ts[1:])):
        if a == b:
            raise ValueError(
                f"t must be strictly increasing or strictly decreasing, but t[{i}] = t[{i + 1}] = {a:g}: "
                "equal times are not allowed; remove the repeated time, e.g. "
                + ("t = torch.unique(t).flip(0) (unique sorts increasing; flip keeps t decreasing)"
                   if ts[-1] < ts[0] else "t = torch.unique(t) (which also sorts t increasing)"))
    increasing = ts[1] > ts[0]
    for i, (a, b) in enumerate(zip(ts, ts[1:])):
        if (b > a) != increasing:
            way, sign = ("increasing", "<") if increasing else ("decreasing", ">")
            sa, sb = _distinct(a, b)
            raise ValueError(
                f"t must be strictly {way} (the direction of t[0] -> t[1]), but t[{i + 1}]={sb} {sign} "
                f"t[{i}]={sa}; sort the times: "
                + ("t.sort().values" if increasing else "t.sort(descending=True).values"))


def _distinct(a: float, b: float) -> tuple:
    """``a`` and ``b`` printed with just enough digits to tell them apart."""
    for digits in (6, 9, 12, 15):
        sa, sb = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if sa != sb:
            return sa, sb
    return repr(a), repr(b)


def allowed_options(method: str) -> set:
    """The ``options=`` keys ``method`` accepts (a name of :data:`~pyode_bridge.solvers.METHODS`)."""
    tab = METHODS[method]
    if isinstance(tab, ScipyMethod):
        allowed = _SCIPY_OPTIONS
    else:
        allowed = _ADAPTIVE_OPTIONS if tab.adaptive else _FIXED_OPTIONS
    if isinstance(tab, SolverMethod):
        allowed = allowed | set(tab.OPTIONS)
    if isinstance(tab, ButcherTableau) and tab.implicit:
        allowed = allowed | _NEWTON_OPTIONS
    return set(allowed)


def make_config(method, options, rtol, atol, time_dtype, *, spec=None, adjoint: bool = False) -> SolverConfig:
    """A :class:`SolverConfig` from torchdiffeq-style ``method``/``options``: each option is
    checked and parsed here, once, into the config's parts.

    ``spec`` (a :class:`~pyode_bridge._state.StateSpec`): a tuple state's parts are error-controlled
    each on its own (``control.norm_splits``). A callable ``options["norm"]`` is the norm of the
    scaled error in the state's structure (without ``spec``, the flat state); with ``adjoint=True``
    (``adjoint_options``) it is a backward solve's norm in torchdiffeq's convention and goes to
    ``control.adjoint_norm``.
    """
    method, tab, options = _method_options(method, options)
    rtol, atol = _tolerances(rtol, atol)
    if isinstance(tab, SolverMethod):
        tab = tab.with_options(options)  # pops and checks the method's own keys (max_iters, solver, ...)
    # Each part's options as parsed; the parts are built (frozen) once all are checked.
    control: dict[str, Any] = {"rtol": rtol, "atol": atol}
    if spec is not None and spec.is_tuple:
        control["norm_splits"] = tuple(spec.numels)  # each part of a tuple state error-controlled on its own
    time: dict[str, Any] = {"dtype": _time_dtype(options.pop("dtype")) if "dtype" in options else time_dtype}
    if "max_num_steps" in options:
        control["max_num_steps"] = _positive_int(options, "max_num_steps")
    _fixed_steps(options, time, control.get("max_num_steps", ControlOptions.max_num_steps), adjoint, method)
    _step_factors(options, control, tab, method)
    interp = _stops(options, time)
    _norm(options, control, spec, adjoint)
    newton = _newton_options(options)
    accel = _accel_options(options, tab, method)
    # A fixed-step method without step_size or grid steps on t itself (torchdiffeq's behaviour).
    return SolverConfig(tab, ControlOptions(**control), TimeOptions(**time), newton, AccelOptions(**accel), interp)


def _method_options(method, options) -> tuple[str, Any, dict]:
    """``method`` (None: dopri5) checked and looked up, and a copy of ``options`` with no unknown key."""
    method = "dopri5" if method is None else method
    if not isinstance(method, str) or method not in METHODS:
        adaptive = [k for k, v in METHODS.items() if v.adaptive]
        fixed = [k for k, v in METHODS.items() if not v.adaptive]
        raise ValueError(f"unknown method {method!r}; valid methods: adaptive {adaptive}, "
                         f"fixed-step {fixed}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict of option names to values, got "
                         f"{type(options).__name__}; e.g. options={{'step_size': 0.1}}")
    options = dict(options or {})
    unknown = sorted(set(options) - allowed_options(method))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: "
                         f"{sorted(allowed_options(method))}")
    return method, METHODS[method], options


def _tolerances(rtol, atol) -> tuple[float, float]:
    """``rtol``, ``atol`` as floats: finite, non-negative, not both zero."""
    tols = []
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, torch.Tensor):
            if tol.numel() != 1:
                raise ValueError(f"{name} must be a positive number (per-component tolerances are "
                                 "not supported)")
            _no_meta(name, tol)
            tol = tol.item()
        if (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol)
                or tol < 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {tol!r}; e.g. "
                             f"{name}={1e-7 if name == 'rtol' else 1e-9}")
        tols.append(float(tol))
    if tols[0] == 0 and tols[1] == 0:
        raise ValueError("rtol and atol cannot both be zero: the error test would reject every step; "
                         "give one of them a positive value, e.g. atol=1e-9")
    return tols[0], tols[1]


def _fixed_steps(options: dict, time: dict, max_num_steps: int, adjoint: bool, method: str) -> None:
    """``step_size``, ``grid`` or ``grid_constructor`` (one of them) into ``time``."""
    given = [k for k in ("step_size", "grid", "grid_constructor") if k in options]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are mutually exclusive arguments (options): each "
                         "sets the fixed steps; pass one of them")
    if "step_size" in options:
        h = _as_float("step_size", options.pop("step_size"))
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"options['step_size'] must be a positive number, got {h!r}")
        time["step_size"] = h
    if "grid" in options:
        time["grid"] = _grid(options.pop("grid"), max_num_steps, "backward pass" if adjoint else "forward solve",
                             method)
    if "grid_constructor" in options:
        gc = options.pop("grid_constructor")
        if not callable(gc):
            raise ValueError(f"options['grid_constructor'] must be a function (func, y0, t) -> grid "
                             f"tensor, got {type(gc).__name__}")
        time["grid_constructor"] = gc


def _step_factors(options: dict, control: dict, tab: Any, method: str) -> None:
    """The step-size options (:data:`_STEP_FACTORS`) into ``control``, checked alone and together."""
    for key, (lo, hi, lo_open, hi_open, rule) in _STEP_FACTORS.items():
        if key in options:
            v = _as_float(key, options.pop(key))
            if (math.isnan(v) or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi)):
                raise ValueError(f"options[{key!r}] must be {rule}, got {v!r}")
            control[key] = v
    steps = ControlOptions(**control)  # with the defaults, for the checks across options
    if steps.min_step > steps.max_step:
        raise ValueError(f"options['min_step']={steps.min_step!r} exceeds options['max_step']="
                         f"{steps.max_step!r}; lower min_step or raise max_step")
    order = getattr(tab, "error_order", None)
    if steps.beta is not None and order and steps.beta >= 4.0 / (3.0 * order):
        # The controller's error exponent is 1/k - 0.75 beta: at or past this bound a larger error
        # no longer shrinks the step.
        raise ValueError(f"options['beta']={steps.beta!r} is too large for method {method!r} (error order "
                         f"{order}): it must be below {4.0 / (3.0 * order):.4g}, so that a larger error "
                         f"still shrinks the step; the default is {0.2 / order:.4g}")


def _stops(options: dict, time: dict) -> str | None:
    """``perturb``, ``step_t``, ``jump_t`` into ``time``; returns ``interp``."""
    if "perturb" in options:
        p = options.pop("perturb")
        if p not in (True, False):
            raise ValueError(f"options['perturb'] must be True or False, got {p!r}")
        time["perturb"] = bool(p)
    interp = options.pop("interp", None)
    if interp not in (None, "linear", "cubic"):
        raise ValueError(f"options['interp'] must be 'linear' or 'cubic' (or None: the method's own "
                         f"continuous extension), got {interp!r}")
    step_t = _times("step_t", options.pop("step_t", None))
    jump_t = _times("jump_t", options.pop("jump_t", None))
    both = step_t + jump_t
    if len(set(both)) != len(both):
        raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")
    time["step_t"], time["jump_t"] = step_t, jump_t
    return interp


def _norm(options: dict, control: dict, spec: Any, adjoint: bool) -> None:
    """``options['norm']`` into ``control``: ``seminorm``, a forward ``norm`` or an ``adjoint_norm``."""
    if "norm" not in options:
        return
    norm = options.pop("norm")
    if norm == "seminorm":
        control["seminorm"] = True
    elif callable(norm):
        if adjoint:
            control["adjoint_norm"] = _scalar_norm(norm, "adjoint_options['norm']")
        else:
            control["norm"] = StateNorm(_scalar_norm(norm, "options['norm']"), spec)
    else:
        raise ValueError(f"options['norm'] must be a function of the scaled error (a tensor, or a "
                         f"tuple for a tuple state) returning a 0-d tensor, or 'seminorm' (in "
                         f"adjoint_options: leave the parameter integral out of the backward error "
                         f"norm), got {norm!r}")


def _accel_options(options: dict, tab: Any, method: str) -> dict[str, Any]:
    """``compile`` and ``cuda_graph`` (the rest of cuda_graph is checked against the state and t,
    in ``check_cuda_graph``)."""
    accel: dict[str, Any] = {}
    if "compile" in options:
        accel["compile"] = compile_settings(options.pop("compile"))
        if accel["compile"] is not None and (not isinstance(tab, ButcherTableau) or tab.implicit):
            raise ValueError(f"options['compile'] compiles explicit Runge-Kutta steps; method {method!r} "
                             "has steps of its own: drop 'compile' or use e.g. 'dopri5', 'tsit5', 'rk4'")
    if "cuda_graph" in options:
        v = options.pop("cuda_graph")
        if not isinstance(v, bool):
            raise ValueError(f"options['cuda_graph'] must be True or False, got {v!r}")
        accel["cuda_graph"] = v
    return accel


# Step-size options: (lowest, highest, lowest excluded, highest excluded, what the message asks for).
_STEP_FACTORS = {
    "first_step": (0.0, math.inf, True, True, "a positive finite number (the first step's size)"),
    "max_step": (0.0, math.inf, True, False, "a positive number (math.inf: no limit)"),
    "min_step": (0.0, math.inf, False, True, "a non-negative finite number (0: no limit)"),
    # safety > 1 aims every step past the tolerance; dfactor >= 1 never shrinks a rejected step,
    # and ifactor < 1 never lets one grow: each loops until max_num_steps or step underflow.
    "safety": (0.0, 1.0, True, False, "a number in (0, 1], e.g. 0.9"),
    "ifactor": (1.0, math.inf, False, True, "a finite number >= 1 (the most a step may grow), e.g. 10"),
    "dfactor": (0.0, 1.0, True, True, "a number in (0, 1) (the most a step may shrink), e.g. 0.2"),
    "beta": (0.0, math.inf, False, True, "a non-negative finite number (the PI controller's beta)"),
}


def _time_dtype(d):
    """``options['dtype']``: the floating dtype ``func`` receives ``t`` in."""
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"options['dtype'] must be a floating torch dtype (the dtype func receives t "
                         f"in), got {d!r}; pass torch.float64 or torch.float32, or leave it out (the "
                         "state's dtype)")
    return d


def _grid(g, max_num_steps: int, context: str, method: str) -> list:
    """``options['grid']`` as a list of floats: 1-D, at least two finite times, strictly monotone,
    with at most ``max_num_steps`` steps (counted before the list is built)."""
    if isinstance(g, torch.Tensor):
        _no_meta("options['grid']", g)
    try:
        # A list in float64 (as_tensor would make it float32 and move every time).
        g = g.detach() if isinstance(g, torch.Tensor) else torch.as_tensor(g, dtype=torch.float64)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"options['grid'] must be a 1-D tensor (or list) of step boundaries, got "
                         f"{type(g).__name__}") from e
    if g.dim() != 1 or g.numel() < 2 or not (g.is_floating_point() or g.dtype in _INTS):
        raise ValueError(f"options['grid'] must be a 1-D tensor (or list) of at least two times, from t[0] "
                         f"to t[-1], got shape {tuple(g.shape)} ({g.dtype}); e.g. "
                         "options={'grid': torch.linspace(t[0], t[-1], 101)}")
    if g.numel() - 1 > max_num_steps:
        raise SolverError(f"{context} with method '{method}': options['grid'] has {g.numel() - 1} steps, "
                          f"more than max_num_steps={max_num_steps}; raise options={{'max_num_steps': "
                          "...} or pass a coarser grid.")
    g = g.to("cpu", torch.float64)
    if not bool(torch.isfinite(g).all()):
        bad = (~torch.isfinite(g)).nonzero().flatten().tolist()
        raise ValueError(f"options['grid'] contains NaN or Inf at index {bad[:5]}; the step boundaries "
                         "must be finite times")
    steps = g[1:] - g[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        i = int((steps * steps[0].sign() <= 0).nonzero()[0, 0]) if steps[0] != 0 else 0
        raise ValueError(f"options['grid'] must be strictly monotone (increasing from t[0] to t[-1], or "
                         f"decreasing for a solve backwards in time), but grid[{i}]={float(g[i])!r} and "
                         f"grid[{i + 1}]={float(g[i + 1])!r}; sort it and remove repeats, e.g. "
                         "torch.unique(grid)")
    return g.tolist()


_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _times(key: str, value) -> tuple:
    """``options[key]`` (``step_t``/``jump_t``: a tensor or sequence of times) as finite floats."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        _no_meta(f"options[{key!r}]", value)
    try:
        ts = [float(x) for x in torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"options[{key!r}] must be a 1-D tensor (or list) of times, got {value!r}") from e
    if not all(math.isfinite(x) for x in ts):
        raise ValueError(f"options[{key!r}] contains NaN or Inf; pass finite times")
    return tuple(ts)


def _scalar_norm(norm, key: str):
    """``norm`` checked on every call to return one number (the step-size controller compares it
    with 1): anything else is named as the user's option, not a failure deep in the solver."""
    def checked(*args):
        r = norm(*args)
        if isinstance(r, torch.Tensor):
            if r.numel() != 1:
                raise ValueError(f"{key} must return one number (a 0-d tensor: the size of the scaled "
                                 f"error), got a tensor of shape {tuple(r.shape)}; reduce it, e.g. "
                                 "lambda e: e.abs().max() (tuple states: max over the parts)")
        elif isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise ValueError(f"{key} must return one number (a 0-d tensor), got {type(r).__name__}")
        return r

    return checked


class StateNorm:
    """``norm`` (a function of the scaled error in the state's structure) as the solver's
    ``norm(e_y (N,), e_q) -> 0-d`` of the flat scaled error (``e_q``, a quadrature's, is never
    passed to it: forward solves have none). ``state_norm`` keeps ``norm`` itself, from which the
    backward solves' default norm is built (so the raw options are not read again)."""

    def __init__(self, norm: Callable[[Any], Any], spec: StateSpec | None = None):
        self.state_norm, self.spec = norm, spec

    def __call__(self, e_y: torch.Tensor, e_q: torch.Tensor | None) -> Any:
        return self.state_norm(e_y if self.spec is None else self.spec.unflatten(e_y))



def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.abs().pow(2).mean().sqrt()


def default_adjoint_norm(norm, spec, seminorm: bool):
    """torchdiffeq's default backward-solve norm built from a user's state norm ``norm``:
    ``max(|t|, norm(y), norm(adj_y), max_i rms(adj_param_i))`` (without the parameters for the
    seminorm), in torchdiffeq's convention ``(t, *y_parts, *adj_y_parts, *adj_params)``."""
    k = len(spec.shapes)

    def structured(parts):
        return tuple(parts) if spec.is_tuple else parts[0]

    def adjoint_norm(tensors):
        t, y, adj, params = tensors[0], tensors[1:1 + k], tensors[1 + k:1 + 2 * k], tensors[1 + 2 * k:]
        out = max(t.abs(), norm(structured(y)), norm(structured(adj)))
        if not seminorm and params:
            out = max(out, max(_rms(p) for p in params))
        return out

    return adjoint_norm


CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


def step_callbacks(func, spec, config: SolverConfig, adjoint: bool = False):
    """The step callbacks ``func`` carries as attributes (torchdiffeq's ``callback_step``,
    ``callback_accept_step``, ``callback_reject_step``; with ``adjoint``, their ``_adjoint``
    variants, called by backward solves) as a :class:`StepCallbacks` for ``config``, or None.

    Each is called as ``cb(t0, y0, dt)`` with ``t0``/``dt`` 0-d tensors of the time dtype and
    ``y0`` the state in its structure (a backward solve's flat state for the adjoint variants).
    A callback the method never calls (accept/reject of a fixed-step solve, any of scipy's) gets
    torchdiffeq's warning.
    """
    suffix = "_adjoint" if adjoint else ""
    found = {name: getattr(func, name + suffix, None) for name in CALLBACK_NAMES}
    found = {k: v for k, v in found.items() if callable(v)}
    if not found:
        return None
    tab = config.method
    if isinstance(tab, ScipyMethod):
        valid = set()
    elif config.adaptive:
        valid = set(CALLBACK_NAMES)
    else:
        valid = {"callback_step"}
    invalid = {k + suffix for k in found} - {k + suffix for k in valid}
    if invalid:
        # The caller's line: odeint -> _problem.solve (or odeint_until_event) -> prepare (or
        # adjoint_config) -> here.
        warnings.warn(f"Solver '{tab.name}' does not support callbacks {invalid}", stacklevel=5)
    dtype = config.time.dtype or spec.dtype
    device = spec.device

    def wrap(cb):
        def call(t, y, h):
            state = y if adjoint else spec.unflatten(y)
            cb(torch.tensor(t, dtype=dtype, device=device), state, torch.tensor(h, dtype=dtype, device=device))
        return call

    calls = [wrap(found[k]) if k in found and k in valid else None for k in CALLBACK_NAMES]
    return StepCallbacks(*calls) if any(calls) else None


def _as_float(key: str, value) -> float:
    """A numeric option as a float: a real number or a one-element tensor (not a bool or string)."""
    if isinstance(value, torch.Tensor):
        _no_meta(f"options[{key!r}]", value)
        value = value.item() if value.numel() == 1 else value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"options[{key!r}] must be a number, got {value!r}")
    return float(value)


def _positive_int(options: dict, key: str) -> int:
    """Pop ``options[key]`` and check it is a positive integer (an integral float such as 1e5
    counts; 2.5, True and "100" do not)."""
    m = options.pop(key)
    if isinstance(m, torch.Tensor) and m.numel() == 1 and m.device.type != "meta":
        m = m.item()
    ok = not isinstance(m, bool) and (isinstance(m, numbers.Integral) or (
        isinstance(m, numbers.Real) and math.isfinite(m) and float(m).is_integer()))
    if not ok or m < 1:
        raise ValueError(f"options[{key!r}] must be a positive integer, got {m!r}; pass an int")
    return int(m)


def _newton_options(options: dict) -> NewtonOptions:
    """Newton's method options of implicit methods (already checked to be allowed)."""
    newton: dict[str, Any] = {}
    if "newton_tol" in options:
        v = _as_float("newton_tol", options.pop("newton_tol"))
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"options['newton_tol'] must be a positive number, got {v!r}")
        newton["tol"] = v
    if "max_newton_iters" in options:
        newton["max_iters"] = _positive_int(options, "max_newton_iters")
    if "jacobian" in options:
        j = options.pop("jacobian")
        if j not in ("auto", "dense", "krylov"):
            raise ValueError(f"options['jacobian'] must be 'auto', 'dense' or 'krylov', got {j!r}")
        newton["jacobian"] = j
    return NewtonOptions(**newton)


def check_params(params, dtype, device) -> None:
    """Parameters must live on the state's device and, when floating, share its dtype."""
    for p in params:
        if p.device.type == "meta" and device.type != "meta":
            # .to() cannot copy values a meta tensor does not have.
            raise ValueError(f"a parameter of func (shape {tuple(p.shape)}) is on the meta device (no "
                             f"values); materialize the module first: module.to_empty(device="
                             f"{str(device)!r}) and then initialize or load its weights")
        if p.device != device:
            raise ValueError(f"a parameter of func (shape {tuple(p.shape)}) is on {p.device} but y0 "
                             f"is on {device}; move the module with module.to(y0.device)")
        if p.is_floating_point() and p.dtype != dtype:
            raise ValueError(f"a parameter of func (shape {tuple(p.shape)}) has dtype {p.dtype} but "
                             f"y0 has dtype {dtype}; convert one of them, e.g. module.to({dtype})")


# --- per-sample mode (issue 18): checked here, not yet wired into odeint ---------------------------

STEP_CONTROLS = ("joint", "per_sample")
ON_FAILURE = ("raise", "mask")


def _parts(y0) -> tuple:
    return tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)


def _batch_size(y0, what: str) -> int:
    """The leading dimension ``B`` every part of ``y0`` shares (a per-sample solve's rows)."""
    parts = _parts(y0)
    for i, p in enumerate(parts):
        name = f"y0[{i}]" if isinstance(y0, (tuple, list)) else "y0"
        if p.dim() == 0 or p.shape[0] != parts[0].shape[0]:
            raise ValueError(f"{what} solves row b of y0 as sample b, so every part of y0 needs the "
                             f"same leading (batch) dimension B; {name} has shape {tuple(p.shape)}"
                             f" and y0[0] {tuple(parts[0].shape)}: give each part a leading batch "
                             "dimension, e.g. logp of shape (B,) beside z of shape (B, D)")
    return int(parts[0].shape[0])


def per_sample_options(options, t_dim: int) -> tuple[str, str, dict]:
    """``options["step_control"]`` and ``options["on_failure"]``, checked; used by per-sample mode.

    A 2-D ``t`` implies ``step_control="per_sample"``. Returns ``(step_control, on_failure, rest)``
    with ``rest`` the options without these two keys (what :func:`make_config` takes).
    """
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"options must be a dict of option names to values, got "
                         f"{type(options).__name__}; e.g. options={{'step_control': 'per_sample'}}")
    rest = dict(options or {})
    control = rest.pop("step_control", "per_sample" if t_dim == 2 else "joint")
    on_failure = rest.pop("on_failure", "raise")
    if control not in STEP_CONTROLS:
        raise ValueError(f"options['step_control'] must be 'joint' (one step size and error test for "
                         f"the whole batch, the default) or 'per_sample' (each batch row its own), got "
                         f"{control!r}")
    if t_dim == 2 and control != "per_sample":
        raise ValueError("a 2-D t (one row of times per sample) is solved with per-sample step control, "
                         "but options['step_control'] is 'joint'; drop the option, or pass a 1-D t "
                         "(the union of the rows' times) for joint control")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"options['on_failure'] must be 'raise' (a failing row stops the solve and "
                         f"is named, the default) or 'mask' (a failing row is NaN from its failure on, "
                         f"the others finish), got {on_failure!r}")
    if on_failure == "mask" and control != "per_sample":
        raise ValueError("options['on_failure']='mask' fails rows one by one, which needs per-sample "
                         "control: add options['step_control']='per_sample' (or pass a 2-D t), or "
                         "drop on_failure")
    return control, on_failure, rest


def check_sample_times(t, y0, device) -> torch.Tensor:
    """A 2-D ``t`` of shape ``(B, T)``: row ``b`` holds sample ``b``'s output times; used by
    per-sample mode.

    Every row strictly monotone, all rows the same direction, finite, on ``device``, and ``B`` the
    leading dimension of every part of ``y0``. Returns ``t`` (``(B, T)``, unchanged).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"a per-sample t must be a tensor of shape (B, T), got {type(t).__name__}; "
                         "pass e.g. torch.stack([t_0, ..., t_B-1]) of the samples' times")
    _no_meta("t", t)
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"a per-sample t must have shape (B, T) (row b: sample b's T output times), got "
                         f"shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"t has dtype {t.dtype}; pass floating-point times, e.g. t.float()")
    if t.device != device:
        raise ValueError(f"t is on {t.device} but y0 is on {device}; move t with t.to(y0.device)")
    B = _batch_size(y0, "a 2-D t")
    if t.shape[0] != B:
        raise ValueError(f"t has {t.shape[0]} rows but y0 has batch size {B}; a 2-D t needs one row of "
                         "times per sample (row b of t for row b of y0)")
    # The common case on the host: a few NumPy operations (one copy from a GPU) instead of ~10
    # device ones (~80 us per solve on a CPU). float64 holds every floating dtype's values
    # exactly, so the signs of the differences are those of t's own; the checks below find what
    # is wrong where it is not.
    host = t.detach().to("cpu", torch.float64).numpy()
    if np.isfinite(host).all():  # first: inf - inf would warn
        signs = np.sign(host[:, 1:] - host[:, :-1])
        if (signs == signs[:1, :1]).all() and (signs != 0).all():
            return t
    with torch.no_grad():
        d = (t[:, 1:] - t[:, :-1]).sign()
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            b, i = (~finite).nonzero()[0].tolist()
            raise ValueError(f"t[{b}, {i}] = {float(t[b, i])}; integration times must be finite: "
                             "integrate to a large finite time instead")
        repeat = (d == 0).nonzero()
        if len(repeat):
            b, i = repeat[0].tolist()
            raise ValueError(f"each row of t must be strictly monotone, but t[{b}, {i}] = t[{b}, {i + 1}] = "
                             f"{float(t[b, i]):g}: remove the repeated time (rows must keep their length "
                             "T; solve samples of different lengths on their own or pad with later times)")
        direction = d[:, :1]
        turn = (d != direction).nonzero()
        if len(turn):
            b, i = turn[0].tolist()
            raise ValueError(f"each row of t must be strictly monotone, but row {b} turns at t[{b}, {i + 1}]"
                             f" = {float(t[b, i + 1]):g} (after t[{b}, {i}] = {float(t[b, i]):g}); sort "
                             "each row: t.sort(dim=1).values (descending=True for a solve backwards)")
        against = (direction[:, 0] != direction[0, 0]).nonzero()
        if len(against):
            b = int(against[0])
            way = "increases" if float(direction[0, 0]) > 0 else "decreases"
            raise ValueError(f"all rows of t must run in the same direction, but row 0 {way} and row {b} "
                             "does not; solve the rows that run the other way in a separate call")
    return t


def check_sample_stops(step_t, jump_t, batch: int) -> tuple:
    """Per-row ``options["step_t"]``/``options["jump_t"]`` of shape ``(B, K)``; used by per-sample
    mode.

    Each is None (no stops), 1-D (the same stops for every row: :func:`make_config` checks it), or
    ``(B, K)``: row ``b`` holds row ``b``'s ``K`` stops, finite, with no time in both or twice in a
    row. Returns ``(step_t, jump_t)``, each None, unchanged 1-D, or a float64 ``(B, K)`` tensor.
    """
    out = []
    for key, value in (("step_t", step_t), ("jump_t", jump_t)):
        if value is None or not isinstance(value, torch.Tensor) or value.dim() < 2:
            out.append(value)
            continue
        _no_meta(f"options[{key!r}]", value)
        if value.dim() != 2 or value.shape[0] != batch:
            raise ValueError(f"options[{key!r}] per row must have shape (B, K) = ({batch}, K) (row b: "
                             f"sample b's K times), got shape {tuple(value.shape)}; pass a 1-D tensor "
                             "for stops shared by every row")
        value = value.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(value).all()):
            b, i = (~torch.isfinite(value)).nonzero()[0].tolist()
            raise ValueError(f"options[{key!r}][{b}, {i}] is NaN or Inf; pass finite times")
        out.append(value)
    if any(isinstance(v, torch.Tensor) and v.dim() == 2 for v in out):
        # A shared 1-D list of stops counts in every row.
        rows = [v if isinstance(v, torch.Tensor) and v.dim() == 2 else
                torch.tensor(_times(key, v), dtype=torch.float64).expand(batch, -1)
                for key, v in zip(("step_t", "jump_t"), out)]
        both = torch.cat(rows, dim=1).sort(dim=1).values
        same = (both[:, 1:] == both[:, :-1]).nonzero()
        if len(same):
            b, i = same[0].tolist()
            raise ValueError(f"`step_t` and `jump_t` must not have any repeated elements between them "
                             f"(row {b} has {float(both[b, i]):g} twice)")
    return tuple(out)


def check_per_sample_func(func, y0, t0: torch.Tensor) -> Any:
    """Call ``func(t0, y0)`` once with ``t0`` of shape ``(B,)`` and check the result has ``y0``'s
    structure and shapes; used by per-sample mode.

    In per-sample mode ``func`` receives ``t`` of shape ``(B,)`` (row ``b``'s time for row ``b``);
    a ``func`` written for a 0-d ``t`` either fails on it or broadcasts it into a wrong shape, and
    both become a ValueError naming the fix here instead of a failure deep in the solve. Costs one
    evaluation, under the caller's grad mode (a func may differentiate inside). (A ``func``
    that broadcasts ``t`` along a feature dimension of size ``B`` keeps its shape: one call cannot
    tell.) Shapes: ``y0`` ``(B, ...)`` or a tuple of them, ``t0`` ``(B,)``. Returns ``func``'s output
    (per-sample mode's first evaluation is this call).
    """
    fix = ("in per-sample mode func receives t of shape (B,) (row b's time for row b of the state), "
           "not a 0-d t: index or reshape it per row, e.g. t[:, None] * y for y of shape (B, D) "
           "(pyode_bridge.nn layers accept both)")
    try:
        out = func(t0, y0)
    except Exception as e:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"func(t, y0) with t of shape {tuple(t0.shape)} raised {type(e).__name__}: "
                         f"{e}; {fix}") from e
    got, want = _shapes(out), _shapes(y0)
    if got != want:
        raise ValueError(f"func(t, y0) with t of shape {tuple(t0.shape)} returned shape {got}, but y0 has "
                         f"shape {want} (t was likely broadcast against the state); {fix}")
    tuple_y0 = isinstance(y0, (tuple, list))
    for i, (p, y) in enumerate(zip(_parts(out), _parts(y0))):
        if p.dtype != y.dtype:  # else the solve would fail deep inside, writing its outputs
            name = f"y[{i}]" if tuple_y0 else "y"
            raise ValueError(f"func returned dtype {p.dtype} for a state of dtype {y.dtype} (component {i}); "
                             f"{_dtype_hint(p.dtype, y.dtype, name)}.")
    return out


def _shapes(x) -> tuple | None:
    """``x``'s shape, or a tuple of its parts' shapes (None for what is not a tensor)."""
    if isinstance(x, (tuple, list)):
        return tuple(_shapes(p) for p in x)
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None
