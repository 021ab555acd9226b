"""Opt-in compiled Runge-Kutta steps: ``odeint(..., options={"compile": True})``.

Eager PyTorch dispatches every operation of a step separately: for a small vector field the
stage combinations and the calls around ``func`` cost as much as ``func`` itself. With
``compile`` the whole explicit step - :func:`~pyode_bridge.solvers.rk_step` itself, its first
stage and every call of ``func`` - is one ``torch.compile`` region, so inductor fuses the
combinations into the field's own kernels, and AOTAutograd compiles the step's backward too
(``backprop``, the recomputation of ``checkpointed``).

What stays eager: step-size control (the error norm and its one host sync per step), dense
output, NaN/Inf checks, and the backward solves of the adjoint methods (their right-hand side is
a vector-Jacobian product). The numbers equal the eager path's to round-off: the same formulas,
in the same order, but the step size enters the combinations as a tensor factor (see
:func:`~pyode_bridge.solvers.combine.combine_stages`) and fused kernels may round differently
(and so an adaptive solve may, in rare cases where an error ratio sits at 1, take a different
step).

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
from .loop import rk_step, stage_rows
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


def _rk_step(func, layout, tab: ButcherTableau, rows, time_dtype, eval_last: bool, t: torch.Tensor,
             h: torch.Tensor, y: torch.Tensor, f0):
    """The compiled function: :func:`~pyode_bridge.solvers.rk_step` on ``func`` called through
    :func:`_call`. ``t``, ``h``: 0-d float64 tensors (a new time then does not recompile);
    ``f0``: the first stage, or None to evaluate it here."""
    def rhs(s, x):
        return _call(func, s.to(time_dtype), x, layout)

    if f0 is None:
        f0 = rhs(t, y)
    # rk_step's arithmetic on t and h (t + c * h, combine_stages) holds for 0-d tensors too.
    y_new, ks, _, f_new = rk_step(rhs, tab, t, y, f0, h, eval_last=eval_last, rows=rows)  # type: ignore[arg-type]
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
        y_new, ks, f_new = self.fn(self.func, self.layout, tab, stage_rows(tab), self.time_dtype,
                                   eval_last, tt, hh, y, f0)
        rhs.nfe += len(ks) - (1 if f0 is not None else 0)
        return y_new, list(ks), None, f_new
