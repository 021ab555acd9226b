"""Gradients with respect to the integration times ``t``, for every gradient method and backend.

The solve itself works on Python floats, so ``t`` reaches the result through two identity
``autograd.Function`` s placed around it:

- :class:`OutputTimes` after the solve: ``dL/dt_k += g_k . f(t_k, y_k)`` for every output ``k``;
- :class:`StartTime` before it, on ``y0``: ``dL/dt_0 -= a_0 . f(t_0, y_0)`` where ``a_0`` is the
  gradient that reaches ``y0`` (it includes ``g_0``, which the first term cancels).

Together: ``dL/dt_k = g_k . f(t_k, y_k)`` for ``k > 0`` and ``dL/dt_0 = -(dL/dy_0 - g_0) . f(t_0, y_0)``,
torchdiffeq's convention. These are derivatives of the exact solution (``dy(t_k)/dt_k = f``,
``dy(t)/dt_0 = -Phi(t, t_0) f(t_0, y_0)``): for a discrete solve they hold up to the solver's
error, the same accuracy as the adjoint methods' other gradients.
"""
from __future__ import annotations

import torch

from ._state import FlatRHS
from .sensitivity._function import first_order_only

__all__ = ["attach_time_gradients", "make_field"]


# The solver steps on Python floats, so no gradient inside the solve depends on t: a second
# derivative involving t would silently miss those terms.
_NO_SECOND_ORDER = ("second derivatives involving the times t are not supported (the solver steps on "
                    "float times, so gradients inside the solve do not depend on t): use t that does "
                    "not require grad for create_graph=True / Hessians, or differentiate only once.")


class StartTime(torch.autograd.Function):
    """Identity on the flat ``y0`` whose backward adds ``-a_0 . f(t_0, y_0)`` to ``dL/dt_0``."""

    @staticmethod
    def forward(ctx, field, y0, t0):
        ctx.field = field
        ctx.save_for_backward(y0, t0)
        return y0.clone()

    @staticmethod
    def backward(ctx, grad_y0):
        y0, t0 = ctx.saved_tensors
        g_t0 = None
        if ctx.needs_input_grad[2]:
            g_t0 = -(grad_y0 * ctx.field(t0, y0)).sum().to(t0.dtype)
        if torch.is_grad_enabled():
            grad_y0, g_t0 = first_order_only(_NO_SECOND_ORDER, [grad_y0, g_t0], [grad_y0, y0, t0])
        return None, grad_y0, g_t0


class OutputTimes(torch.autograd.Function):
    """Identity on the flat outputs ``ys (T, N)`` whose backward adds ``g_k . f(t_k, y_k)`` to
    ``dL/dt_k``."""

    @staticmethod
    def forward(ctx, field, ys, t):
        ctx.field = field
        ctx.save_for_backward(ys, t)
        return ys.clone()

    @staticmethod
    def backward(ctx, grad_ys):
        ys, t = ctx.saved_tensors
        g_t = None
        if ctx.needs_input_grad[2]:
            # Only outputs that received a gradient cost an evaluation of func.
            hit = grad_ys.reshape(grad_ys.shape[0], -1).ne(0).any(dim=1).tolist()
            zero = torch.zeros((), dtype=ys.dtype, device=ys.device)
            g_t = torch.stack([(grad_ys[k] * ctx.field(t[k], ys[k])).sum() if hit[k] else zero
                               for k in range(ys.shape[0])]).to(t.dtype)
        if torch.is_grad_enabled():
            grad_ys, g_t = first_order_only(_NO_SECOND_ORDER, [grad_ys, g_t], [grad_ys, ys, t])
        return None, grad_ys, g_t


def make_field(func, spec, time_dtype, method: str):
    """``field(t_k, y_k)``: ``func`` at a 0-d time tensor and a flat state, flat result ``(N,)``,
    through the solver's own wrapper (:class:`~pyode_bridge._state.FlatRHS`: ``t`` in the dtype
    ``func`` sees, the output checked). ``t_k`` enters as a number: no derivative flows through
    ``t`` (second derivatives involving ``t`` are refused, see ``_NO_SECOND_ORDER``)."""
    rhs = FlatRHS(func, spec, time_dtype, method, context="backward pass (dL/dt)")
    return lambda t_k, y_k: rhs(float(t_k.detach()), y_k)


def attach_time_gradients(field, t: torch.Tensor, y0_flat: torch.Tensor, solve) -> torch.Tensor:
    """Run ``solve(y0_flat) -> ys (T, N)`` so that ``t`` (a 1-D tensor requiring grad) gets its
    gradient. Returns the flat outputs ``(T, N)``."""
    y0_hooked = StartTime.apply(field, y0_flat, t[0])
    ys = solve(y0_hooked)
    return OutputTimes.apply(field, ys, t)
