"""``backprop``: autograd through the solver's operations (exact gradient of the discrete solve)."""
from __future__ import annotations

import torch

from ..solvers import integrate
from .base import Problem, Sensitivity

__all__ = ["Backprop"]


class Backprop(Sensitivity):
    """Differentiate through every operation of the forward solve.

    Exact gradient of the discrete map (accepted step sizes are constants). Memory grows with the
    number of steps times the activations of ``func``: O(L * Nt).
    """

    name = "backprop"

    def solve(self, prob: Problem, y0: torch.Tensor) -> torch.Tensor:
        nfe0 = prob.rhs.nfe
        res = integrate(prob.rhs, y0, prob.t_eval, prob.config)
        prob.stats.nfe_forward += prob.rhs.nfe - nfe0
        prob.stats.steps_forward += res.steps
        prob.stats.steps_rejected += res.rejected
        return res.stacked()
