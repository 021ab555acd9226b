"""The one ``torch.autograd.Function`` behind every memory-lean gradient method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AdjointFunction", "Saved", "first_order_only"]


@dataclass
class Saved:
    """What a gradient method keeps from its forward for its backward.

    ``tensors`` go through ``ctx.save_for_backward``, so autograd owns their lifetime: they are
    freed after a backward unless ``retain_graph=True``, and a second backward through a retained
    graph sees them again. ``meta`` holds plain Python data (times, counts) to rebuild the method's
    objects (interpolants, dense steps) from the tensors.
    """

    tensors: list = field(default_factory=list)
    meta: Any = None


class AdjointFunction(torch.autograd.Function):
    """Forward: ``strategy.forward_pass`` under no_grad. Backward: ``strategy.backward_pass``.

    Inputs are ``(strategy, problem, y0 (N,), *params)``; the output is ``ys (T, N)``.
    """

    @staticmethod
    def forward(ctx, strategy, prob, y0, *params):
        with torch.no_grad():
            ys, saved = strategy.forward_pass(prob, y0.detach())
        ctx.strategy, ctx.prob, ctx.meta = strategy, prob, saved.meta
        ctx.save_for_backward(ys, *saved.tensors)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        tensors = ctx.saved_tensors
        ys, kept = tensors[0], list(tensors[1:])
        second_order = torch.is_grad_enabled()  # backward(create_graph=True)
        with torch.no_grad():
            g_y0, g_params = ctx.strategy.backward_pass(ctx.prob, Saved(kept, ctx.meta), ys,
                                                         grad_ys.detach())
        grads = [g_y0, *g_params]
        if second_order:
            grads = first_order_only(
                f"sensitivity='{ctx.strategy.name}' computes first derivatives only: its gradient "
                "cannot be differentiated again (create_graph=True, gradgradcheck, Hessians). Use "
                "sensitivity='backprop', which differentiates through the solver's operations.",
                grads, [grad_ys, ys])  # ys leads back to y0 and the parameters
        return (None, None, *grads)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on gradients computed without a graph; differentiating them raises.

    Under ``create_graph=True`` an adjoint's gradient would otherwise be a constant for autograd,
    and any second derivative through it would be silently zero."""

    @staticmethod
    def forward(ctx, message, n, *args):
        ctx.message = message
        return tuple(a.clone() for a in args[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def first_order_only(message: str, grads: list, deps: list) -> list:
    """``grads`` (tensors or None) unchanged, but attached to ``deps`` (the inputs they depend on)
    through a node that raises ``RuntimeError(message)`` if a second derivative passes through it."""
    present = [i for i, g in enumerate(grads) if g is not None]
    deps = [d for d in deps if isinstance(d, torch.Tensor) and d.requires_grad]
    if not present or not deps:
        return grads
    wrapped = _FirstOrderOnly.apply(message, len(present), *[grads[i] for i in present], *deps)
    out = list(grads)
    for i, w in zip(present, wrapped):
        out[i] = w
    return out
