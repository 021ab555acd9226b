"""Opt-in compiled Runge-Kutta steps: ``odeint(..., options={"compile": True})``.

Eager PyTorch dispatches every operation of a step separately: for a small vector field the
stage combinations and the calls around ``func`` cost as much as ``func`` itself. With
``compile`` the whole explicit step - first stage, the stage loop, the stage combinations and
every call of ``func`` - is one ``torch.compile`` region, so inductor fuses the combinations into
the field's own kernels, and AOTAutograd compiles the step's backward too (``backprop``, the
recomputation of ``checkpointed``).

What stays eager: step-size control (the error norm and its one host sync per step), dense
output, NaN/Inf checks, and the backward solves of the adjoint methods (their right-hand side is
a vector-Jacobian product). The numbers equal the eager path's to round-off: the same formulas,
in the same order, but fused kernels may round differently (and so an adaptive solve may, in
rare cases where an error ratio sits at 1, take a different step).

Caching: one compiled function serves every solve; ``torch.compile`` keeps its graphs keyed by
guards (``func``'s identity, the tableau, shapes, dtypes, grad mode), so a training loop that
calls ``odeint`` with the same ``func`` compiles once (a few graphs: grad mode on/off, the step
with or without its first stage given). dynamo keeps at most ``torch._dynamo.config
.cache_size_limit`` (default 8) graphs per compiled function *for all funcs together*; past it,
new variants run eagerly (with dynamo's warning). Pass the same ``func`` object each iteration (a
module, or a function defined once): a new lambda per call would not match the cached guards.

Cold start (measured on the 2-core CPU test machine, one thread, MLP 2-64-2, dopri5): the first
solve with inductor takes tens of seconds (C++ code generation; cached on disk for later
processes by inductor's own cache), ``backend="aot_eager"`` a few seconds.
"""
from __future__ import annotations

import torch

from ..errors import SolverError
from .tableau import ButcherTableau

__all__ = ["CompiledStep", "compile_settings"]

_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


def compile_settings(value) -> dict | None:
    """``options["compile"]`` as ``torch.compile`` keyword arguments (``None`` when off).

    ``True`` is ``torch.compile``'s defaults (inductor) with ``dynamic=False`` (shapes are fixed
    within a solve); a dict passes ``backend``, ``mode`` (e.g. ``"reduce-overhead"``: CUDA graphs
    of the compiled step on a GPU), ``fullgraph``, ``dynamic``, ``options`` through.
    """
    if value is None or value is False:
        return None
    if value is True:
        return {"dynamic": False}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"options['compile'] takes torch.compile's keywords {list(_KEYS)}; "
                             f"unknown {unknown}")
        return {"dynamic": False, **value}
    raise ValueError(f"options['compile'] must be True, False or a dict of torch.compile keywords "
                     f"(e.g. {{'backend': 'aot_eager'}}), got {value!r}")


_COMPILED: dict = {}  # settings -> the compiled _rk_step (one per distinct settings)


def _compiled_step(settings: dict):
    key = tuple(sorted((k, repr(v)) for k, v in settings.items()))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(_rk_step, **settings)
    return fn


def _call(func, t, y, layout):
    """``func(t, y)`` on the flat state ``y``, flat output; ``layout`` = (shapes, numels, dtype)."""
    shapes, numels, dtype = layout
    if len(shapes) == 1:
        out = func(t, y.view(shapes[0]))
        parts = (out,)
    else:
        out = func(t, tuple(p.view(s) for p, s in zip(y.split(numels), shapes)))
        parts = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    # Traced once: the structure is static, so these tests cost nothing per step. The eager
    # FlatRHS has already checked func's output on the solve's first evaluation.
    if len(parts) != len(shapes) or any(not isinstance(p, torch.Tensor) or p.shape != s or p.dtype != dtype
                                        for p, s in zip(parts, shapes)):
        raise SolverError("with options={'compile': ...} func returned a different structure, shape or "
                          "dtype than at the solve's first evaluation; func(t, y) must return dy/dt "
                          "with y's structure, shape and dtype at every t")
    if len(parts) == 1:
        return parts[0].reshape(-1)
    return torch.cat([p.reshape(-1) for p in parts])


def _combine(base, coefs, vs, h):
    """``base + h * sum c * v`` (``base`` may be None) as :func:`~pyode_bridge.solvers.combine`
    forms it: the increment summed first, then added to the state once; zero coefficients skipped
    (Python floats: the test is resolved while tracing)."""
    inc = None
    for c, v in zip(coefs, vs):
        if c == 0.0:
            continue
        inc = v * (h * c) if inc is None else inc + v * (h * c)
    if inc is None:
        return base
    return inc if base is None else base + inc


def _rk_step(func, layout, tab: ButcherTableau, time_dtype, eval_last: bool, t, h, y, f0):
    """One explicit step (the compiled function). ``t``, ``h``: 0-d float64 tensors (tensors, so
    that a new time does not recompile); ``f0``: the first stage, or None to evaluate it here."""
    ks = [f0 if f0 is not None else _call(func, t.to(time_dtype), y, layout)]
    y_new, f_new = None, None
    last = tab.stages - 1
    for i in range(1, tab.stages):
        yi = _combine(y, tab.a[i], ks, h)
        if tab.fsal and i == last and not eval_last:
            y_new = yi
            break
        fi = _call(func, (t + tab.c[i] * h).to(time_dtype), yi, layout)
        if tab.fsal and i == last:
            y_new, f_new = yi, fi
        ks.append(fi)
    if y_new is None:
        y_new = _combine(y, tab.b, ks, h)
    return y_new, ks, f_new


class CompiledStep:
    """The compiled step of one solve: ``step(tab, t, y, f0, h, eval_last)`` with
    :func:`~pyode_bridge.solvers.rk_step`'s results ``(y_new, ks, None, f_new)``.

    Attached to the solve's :class:`~pyode_bridge._state.FlatRHS` as ``rhs.compiled`` (``rk_step``
    uses it for explicit tableaux without a quadrature); counts its evaluations into ``rhs.nfe``.

    Args:
        func: the user's ``func(t, y)``.
        spec: the state's :class:`~pyode_bridge._state.StateSpec`.
        time_dtype: dtype of the ``t`` passed to ``func``.
        settings: ``torch.compile`` keywords (see :func:`compile_settings`).
    """

    def __init__(self, func, spec, time_dtype, settings: dict):
        self.func, self.time_dtype = func, time_dtype
        self.layout = (tuple(tuple(s) for s in spec.shapes), tuple(spec.numels), spec.dtype)
        self.fn = _compiled_step(settings)

    def step(self, rhs, tab: ButcherTableau, t: float, y, f0, h: float, eval_last: bool = True):
        """One step from ``(t, y)``; shapes as :func:`~pyode_bridge.solvers.rk_step`."""
        dev = y.device
        tt = torch.full((), t, dtype=torch.float64, device=dev)
        hh = torch.full((), h, dtype=torch.float64, device=dev)
        y_new, ks, f_new = self.fn(self.func, self.layout, tab, self.time_dtype, eval_last, tt, hh, y, f0)
        rhs.nfe += len(ks) - (1 if f0 is not None else 0)
        return y_new, list(ks), None, f_new
