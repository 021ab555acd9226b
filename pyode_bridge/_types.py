"""Names for the shapes and callables of the core contracts (solvers, gradient methods, memory).

They are plain aliases: a type checker sees ``torch.Tensor`` and the reader sees which tensor.
``N`` is the flat state's size (every component of a tuple state, the whole batch), ``T`` the number
of output times, ``Q`` the size of the quadrature that rides along a backward solve (the flat
parameter gradient ``dL/dtheta``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor

__all__ = ["State", "Func", "FlatState", "FlatTrajectory", "Quadrature", "Times", "RHS", "ParamGrads",
           "Gradients"]

State = Union[Tensor, tuple[Tensor, ...]]
"""The user's state: one tensor of any shape, or a tuple of them."""

Func = Callable[[Tensor, Any], Any]
"""The user's ``func(t, y) -> dy/dt``: ``t`` a 0-d tensor, ``y`` and the result a :data:`State` of
one structure (a tuple state's ``y`` is a tuple; a list return is accepted)."""

FlatState = Tensor
"""A state, derivative or adjoint as the solvers hold it: one flat vector ``(N,)``."""

FlatTrajectory = Tensor
"""The flat states at the output times, ``(T, N)``, row ``k`` at ``t_eval[k]``."""

Quadrature = Tensor
"""The integral a backward solve carries beside its state, ``(Q,)`` (``dL/dtheta``, flat)."""

Times = Sequence[float]
"""Output times as Python floats, strictly monotone (either direction)."""

RHS = Callable[[float, FlatState], Any]
"""The right-hand side a solver calls: ``rhs(t, y (N,)) -> dy (N,)``, or ``(dy (N,), dq (Q,))``
when a :data:`Quadrature` rides along (fixed per solve, which is why the return is left open)."""

ParamGrads = Sequence[Optional[Tensor]]
"""One gradient per parameter, each of its parameter's shape, or None where it gets none."""

Gradients = tuple[FlatState, ParamGrads]
"""What a gradient method's backward returns: ``(dL/dy0 (N,), ParamGrads)``."""
