"""Solve statistics filled in place by :func:`pyode_bridge.odeint`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["SolveStats"]


@dataclass
class SolveStats:
    """Counters of one ``odeint`` call (forward solve and, once it has run, its backward pass).

    Pass an instance as ``odeint(..., stats=s)``; it is reset at the start of the call and filled in
    place. Backward counters are filled when ``.backward()`` runs through the solve.

    Attributes:
        nfe_forward: right-hand side evaluations in the forward solve.
        nfe_backward: right-hand side evaluations (forward or vector-Jacobian products) in the backward.
        steps_forward: accepted steps of the forward solve.
        steps_rejected: rejected steps of the forward solve.
        steps_backward: accepted steps of the backward solve (or steps recomputed by ``checkpointed``).
        steps_backward_rejected: rejected steps of the backward solve.
        interpolation_nodes: for ``Interpolated``: Chebyshev node count used on each output interval
            (split at ``jump_t``; per-sample: on each column of the rows' output and jump times).
        interpolation_error: for ``Interpolated``: largest measured error of the interpolant against
            the dense output at off-grid points, in units of the tolerance (the guard's measure).
        dense_output_error: for ``Interpolating``: the distance, relative to the state and
            averaged over time, between the dense output the backward reads ``z`` from and an
            independent interpolant of each step (the guard's measure; see
            :class:`~pyode_bridge.sensitivity.Interpolating`).
        backsolve_error: for ``Backsolve``: the estimated relative error of the gradient that the
            reverse-solved state's drift from the forward's causes (0.01 = 1%; the instability
            guard's measure, see :class:`~pyode_bridge.Backsolve`); None with
            ``on_instability="ignore"``.
        sample_steps: per-sample mode: each row's accepted steps, a ``(B,)`` tensor (None otherwise).
            ``steps_forward``/``steps_rejected`` then count the batch's steps: those where some row
            moved, and those where every stepping row was rejected.
        sample_status: per-sample mode: each row's outcome, a ``(B,)`` int64 tensor: 0 finished,
            1 NaN/Inf (func returned it at a finite state, or a fixed step's state became it),
            2 step size underflow, 3 ``max_num_steps`` reached (see
            :mod:`pyode_bridge.solvers.per_sample`); a failed row is NaN from its failure on
            (``options["on_failure"]="mask"``).
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    steps_forward: int = 0
    steps_rejected: int = 0
    steps_backward: int = 0
    steps_backward_rejected: int = 0
    interpolation_nodes: list = field(default_factory=list)
    interpolation_error: float | None = None
    dense_output_error: float | None = None
    backsolve_error: float | None = None
    sample_steps: Tensor | None = None
    sample_status: Tensor | None = None

    def reset(self) -> None:
        """Set every counter back to zero."""
        fresh = SolveStats()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def merge_from(self, other: "SolveStats") -> None:
        """Add ``other``'s counters to this one (used by models that contain several ODE blocks)."""
        for name in ("nfe_forward", "nfe_backward", "steps_forward", "steps_rejected",
                     "steps_backward", "steps_backward_rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.interpolation_nodes = list(self.interpolation_nodes) + list(other.interpolation_nodes)
        for name in ("interpolation_error", "dense_output_error", "backsolve_error"):  # the worst of the blocks
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None and (mine is None or theirs > mine or math.isnan(theirs)):
                setattr(self, name, theirs)
