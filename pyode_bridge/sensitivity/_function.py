"""The one ``torch.autograd.Function`` behind every memory-lean gradient method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .._types import FlatState, FlatTrajectory
from ..solvers.util import RefuseBackward

if TYPE_CHECKING:
    from .base import Problem, TwoPassSensitivity

__all__ = ["AdjointFunction", "Saved", "first_order_only", "partial_gradients"]


@dataclass
class Saved:
    """What a gradient method keeps from its forward for its backward.

    ``tensors`` go through ``ctx.save_for_backward``, so autograd owns their lifetime: they are
    freed after a backward unless ``retain_graph=True``, and a second backward through a retained
    graph sees them again. ``meta`` holds plain Python data (times, counts) to rebuild the method's
    objects (interpolants, dense steps) from the tensors.
    """

    tensors: list[torch.Tensor] = field(default_factory=list)
    meta: Any = None


class AdjointFunction(torch.autograd.Function):
    """Forward: ``strategy.forward_pass`` under no_grad. Backward: ``strategy.backward_pass``.

    Inputs are ``(strategy, problem, y0 (N,), *params)``; the output is ``ys (T, N)``. ``func``'s
    errors name the pass: ``"forward solve"``, ``"backward pass (<strategy.name>)"``.
    """

    @staticmethod
    def forward(ctx: Any, strategy: TwoPassSensitivity, prob: Problem, y0: FlatState, *params: torch.Tensor
                ) -> FlatTrajectory:
        with torch.no_grad(), prob.rhs.solving("forward solve"):
            ys, saved = strategy.forward_pass(prob, y0.detach())
        ctx.strategy, ctx.prob, ctx.meta = strategy, prob, saved.meta
        ctx.save_for_backward(ys, *saved.tensors)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: FlatTrajectory) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        ys, kept = tensors[0], list(tensors[1:])
        second_order = torch.is_grad_enabled()  # backward(create_graph=True)
        with torch.no_grad(), ctx.prob.rhs.solving(f"backward pass ({ctx.strategy.name})"):
            g_y0, g_params = ctx.strategy.backward_pass(ctx.prob, Saved(kept, ctx.meta), ys,
                                                         grad_ys.detach())
        grads = [g_y0, *partial_gradients(ctx.prob.params, list(g_params))]
        if second_order:
            grads = first_order_only(
                f"sensitivity='{ctx.strategy.name}' computes first derivatives only: its gradient "
                "cannot be differentiated again (create_graph=True, gradgradcheck, Hessians). Use "
                "sensitivity='backprop', which differentiates through the solver's operations.",
                grads, [grad_ys, ys])  # ys leads back to y0 and the parameters
        return (None, None, *grads)


def partial_gradients(params, grads: list) -> list:
    """The gradients to return for ``params`` so that autograd's accumulation gives each one its
    total derivative ``grads`` (the backward solves differentiate ``func`` through every path,
    including the graph that computed one listed tensor from another).

    A listed non-leaf tensor ``w`` passes its gradient on to the tensors it was computed from; where
    one of them, ``p``, is listed too, ``grads[p]`` already holds that path, and autograd would add
    it a second time (torchdiffeq does: ``adjoint_params=(2 * p, p)`` gives twice ``dL/dp``'s share
    through ``w``). Each listed tensor therefore returns its total less what the listed tensors
    computed from it pass back: ``D = V - M^T D``, ``M`` the Jacobians between listed tensors. That
    graph has no cycles, so iterating from ``D = V`` is exact after at most (number of listed
    non-leaf tensors) rounds; each round is one backward through the graph between them.
    """
    nonleaf = [i for i, p in enumerate(params) if p.grad_fn is not None and grads[i] is not None]
    if not nonleaf or len(params) < 2:
        return grads
    targets = [i for i, p in enumerate(params) if p.requires_grad]
    with torch.enable_grad():
        out = list(grads)
        for _ in range(len(nonleaf) + 1):
            passed = torch.autograd.grad([params[i] for i in nonleaf], [params[i] for i in targets],
                                         [out[i] for i in nonleaf], retain_graph=True, allow_unused=True)
            new = list(grads)
            for i, g in zip(targets, passed):
                if g is None:
                    continue
                # autograd hands back a listed tensor's own incoming gradient as part of "passed"
                own = out[i] if i in nonleaf else None
                back = g - own if own is not None else g
                new[i] = back.neg() if grads[i] is None else grads[i] - back
            converged = all(torch.equal(new[i], out[i]) for i in nonleaf)
            out = new
            if converged:
                break
    return [g.detach() if g is not None else None for g in out]


def first_order_only(message: str, grads: list, deps: list) -> list:
    """``grads`` (tensors or None) unchanged, but attached to ``deps`` (the inputs they depend on)
    through a node that raises ``RuntimeError(message)`` if a second derivative passes through it
    (under ``create_graph=True`` an adjoint's gradient would otherwise be a constant for autograd,
    and any second derivative through it would be silently zero)."""
    present = [i for i, g in enumerate(grads) if g is not None]
    deps = [d for d in deps if isinstance(d, torch.Tensor) and d.requires_grad]
    if not present or not deps:
        return grads
    wrapped = RefuseBackward.apply(RuntimeError, message, len(present), *[grads[i] for i in present], *deps)
    out = list(grads)
    for i, w in zip(present, wrapped):
        out[i] = w
    return out
