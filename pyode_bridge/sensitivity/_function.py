"""The one ``torch.autograd.Function`` behind every memory-lean gradient method."""
from __future__ import annotations

import torch

__all__ = ["AdjointFunction"]


class AdjointFunction(torch.autograd.Function):
    """Forward: ``strategy.forward_pass`` under no_grad. Backward: ``strategy.backward_pass``.

    Inputs are ``(strategy, problem, y0 (N,), *params)``; the output is ``ys (T, N)``.
    """

    @staticmethod
    def forward(ctx, strategy, prob, y0, *params):
        with torch.no_grad():
            ys, saved = strategy.forward_pass(prob, y0.detach())
        ctx.strategy, ctx.prob, ctx.saved = strategy, prob, saved
        ctx.save_for_backward(ys)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        (ys,) = ctx.saved_tensors
        with torch.no_grad():
            g_y0, g_params = ctx.strategy.backward_pass(ctx.prob, ctx.saved, ys, grad_ys)
        ctx.saved = None  # free checkpoints / interpolation nodes as soon as the backward is done
        return (None, None, g_y0, *g_params)
