"""Input validation for :func:`pyode_bridge.odeint`: every bad input gets a ValueError that names
the problem and the fix."""
from __future__ import annotations

import math

import torch

from .solvers import METHODS, ScipyMethod, SolverConfig, SolverMethod

__all__ = ["check_state", "check_time", "make_config", "check_params", "BACKENDS"]

BACKENDS = ("torch", "julia")
_FLOATS = (torch.float32, torch.float64)
_FIXED_OPTIONS = {"step_size", "grid", "max_num_steps", "dtype"}
_ADAPTIVE_OPTIONS = _FIXED_OPTIONS | {"first_step", "max_step", "safety", "ifactor", "dfactor", "beta"}
# scipy chooses its own steps with its own controller: no grid, no PI coefficients.
_SCIPY_OPTIONS = {"max_num_steps", "dtype", "first_step", "max_step"}


def check_state(y0):
    """``y0`` must be a floating tensor or a non-empty tuple of them, on one device, one dtype."""
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not parts:
        raise ValueError("y0 is an empty tuple; pass a tensor or a tuple of tensors")
    for i, p in enumerate(parts):
        name = f"y0[{i}]" if isinstance(y0, (tuple, list)) else "y0"
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
        if p.dtype not in _FLOATS:
            raise ValueError(f"{name} has dtype {p.dtype}; pyode-bridge solves in float32 or "
                             f"float64: convert with {name}.float() or {name}.double()")
        if p.dtype != parts[0].dtype:
            raise ValueError(f"the parts of y0 have different dtypes ({parts[0].dtype} and {p.dtype} "
                             f"at index {i}); convert them to one dtype")
        if p.device != parts[0].device:
            raise ValueError(f"the parts of y0 are on different devices ({parts[0].device} and "
                             f"{p.device} at index {i}); move them to one device with .to(device)")
        if p.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(p.shape)})")
    with torch.no_grad():
        bad = [i for i, p in enumerate(parts) if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"y0 contains NaN or Inf (component(s) {bad}); the initial state must be "
                         "finite")


def check_time(t, dtype, device, grad_needed: bool) -> list:
    """``t`` must be 1-D, finite, strictly monotone, on ``device``. Returns it as Python floats."""
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(f"t must be a 1-D tensor of times, got {type(t).__name__}") from e
        t = t.to(device)
    if t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of times, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"t has dtype {t.dtype}; pass floating-point times, e.g. t.float()")
    if t.device != device:
        raise ValueError(f"t is on {t.device} but y0 is on {device}; move t with t.to(y0.device)")
    if t.numel() == 0:
        raise ValueError("t is empty; pass at least the start and end times")
    ts = [float(x) for x in t.detach().cpu().tolist()]
    if any(math.isnan(x) for x in ts):
        raise ValueError(f"t contains NaN at index {[i for i, x in enumerate(ts) if math.isnan(x)]}")
    if any(math.isinf(x) for x in ts):
        raise ValueError("t contains Inf; integration times must be finite")
    if len(ts) < 2 and grad_needed:
        raise ValueError("t has a single time but gradients are needed; pass at least two times "
                         "(start and end)")
    if len(ts) >= 2:
        diffs = [b - a for a, b in zip(ts, ts[1:])]
        increasing = diffs[0] > 0
        for i, d in enumerate(diffs):
            if d == 0 or (d > 0) != increasing:
                raise ValueError(
                    f"t must be strictly {'increasing' if increasing else 'decreasing'}; t[{i}]="
                    f"{ts[i]:g} and t[{i + 1}]={ts[i + 1]:g} break it (sort t and remove "
                    "duplicates)")
    return ts


def make_config(method, options, rtol, atol, time_dtype) -> SolverConfig:
    """A :class:`SolverConfig` from torchdiffeq-style ``method``/``options``."""
    method = "dopri5" if method is None else method
    if not isinstance(method, str) or method not in METHODS:
        adaptive = [k for k, v in METHODS.items() if v.adaptive]
        fixed = [k for k, v in METHODS.items() if not v.adaptive]
        raise ValueError(f"unknown method {method!r}; valid methods: adaptive {adaptive}, "
                         f"fixed-step {fixed}")
    tab = METHODS[method]
    options = dict(options or {})
    if isinstance(tab, ScipyMethod):
        allowed = _SCIPY_OPTIONS
    else:
        allowed = _ADAPTIVE_OPTIONS if tab.adaptive else _FIXED_OPTIONS
    if isinstance(tab, SolverMethod):
        allowed = allowed | set(tab.OPTIONS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: "
                         f"{sorted(allowed)}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, torch.Tensor):
            if tol.numel() != 1:
                raise ValueError(f"{name} must be a positive number (per-component tolerances are "
                                 "not supported)")
            tol = float(tol)
        if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {tol!r}")
    rtol, atol = float(rtol), float(atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be zero")
    if isinstance(tab, SolverMethod):
        tab = tab.with_options(options)  # pops and checks the method's own keys (max_iters, solver, ...)
    cfg = SolverConfig(tableau=tab, rtol=rtol, atol=atol, time_dtype=options.pop("dtype", time_dtype))
    if "step_size" in options:
        h = options.pop("step_size")
        h = float(h)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"options['step_size'] must be a positive number, got {h!r}")
        cfg.step_size = h
    if "grid" in options:
        g = options.pop("grid")
        cfg.grid = [float(x) for x in (g.tolist() if isinstance(g, torch.Tensor) else g)]
    if "max_num_steps" in options:
        m = options.pop("max_num_steps")
        if int(m) < 1:
            raise ValueError(f"options['max_num_steps'] must be a positive integer, got {m!r}")
        cfg.max_num_steps = int(m)
    for key in ("first_step", "max_step", "safety", "ifactor", "dfactor", "beta"):
        if key in options:
            v = float(options.pop(key))
            ok = v >= 0 if key == "beta" else v > 0
            if not ok or (key != "max_step" and not math.isfinite(v)):
                kind = "non-negative" if key == "beta" else "positive"
                raise ValueError(f"options[{key!r}] must be a {kind} number, got {v!r}")
            setattr(cfg, key, v)
    # A fixed-step method without step_size or grid steps on t itself (torchdiffeq's behaviour).
    return cfg


def check_params(params, dtype, device) -> None:
    """Parameters must live on the state's device and, when floating, share its dtype."""
    for p in params:
        if p.device != device:
            raise ValueError(f"a parameter of func (shape {tuple(p.shape)}) is on {p.device} but y0 "
                             f"is on {device}; move the module with module.to(y0.device)")
        if p.is_floating_point() and p.dtype != dtype:
            raise ValueError(f"a parameter of func (shape {tuple(p.shape)}) has dtype {p.dtype} but "
                             f"y0 has dtype {dtype}; convert one of them, e.g. module.to({dtype})")
