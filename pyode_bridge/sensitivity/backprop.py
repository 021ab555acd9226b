"""``backprop``: autograd through the solver's operations (exact gradient of the discrete solve)."""
from __future__ import annotations

from .._types import FlatState, FlatTrajectory
from ._adjoint import record_forward
from .base import BackwardMemory, Problem, Sensitivity, SolveSize

__all__ = ["Backprop"]


class Backprop(Sensitivity):
    """Differentiate through every operation of the forward solve.

    Exact gradient of the discrete map (accepted step sizes are constants). Memory grows with the
    number of steps times the activations of ``func``: O(L * Nt).
    """

    name = "backprop"
    per_sample = "autograd"
    through_autograd = True
    solves_backward = False

    def solve(self, prob: Problem, y0: FlatState) -> FlatTrajectory:
        return record_forward(prob, y0).stacked()

    def predict_backward_bytes(self, size: SolveSize, *, nodes: int | str | None = None,
                               every: int | None = None, checkpointing: bool | None = None
                               ) -> BackwardMemory:
        """The graph of every kept evaluation, ``(N (S - fsal) + fsal) g``; no outputs kept."""
        evals = size.steps * (size.stages - size.fsal) + size.fsal
        kept = evals * size.eval_saved_bytes
        return BackwardMemory(self.name, kept, kept, f"{evals} g")
