"""``interpolated``: IRDM (Daulbaev et al., NeurIPS 2020) - z(t) by barycentric Lagrange
interpolation on Chebyshev grids recorded from the forward's dense output."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ._adjoint import adjoint_sweep, record_forward, unflatten_param_grads
from .base import Problem, Sensitivity
from .bli import BarycentricInterpolant, chebyshev_points

__all__ = ["Interpolated"]


class Interpolated(Sensitivity):
    """Interpolated reverse dynamic method.

    Forward: the state at ``nodes + 1`` Chebyshev points of every output interval is read from the
    solver's dense output as the steps pass them (no extra function evaluations). Backward: only
    ``[a, dL/dtheta]`` is solved backwards, with ``z(t)`` rebuilt by barycentric interpolation.
    Memory: O(L) + O(nodes) states per output interval.

    Args:
        nodes: polynomial degree per output interval (``nodes + 1`` points, endpoints included),
            or ``"auto"``: record ``max_nodes`` and keep the smallest of 4, 8, 16, ... whose
            interpolant matches the dense output at off-grid points within the solver tolerance
            (the chosen counts are reported in ``stats.interpolation_nodes``).
        max_nodes: the recording grid for ``"auto"`` (a power of two).
        rtol, atol: backward solve tolerances (default: ``adjoint_rtol``/``adjoint_atol``, else the
            forward's).
    """

    name = "interpolated"

    def __init__(self, nodes=16, max_nodes: int = 64, rtol=None, atol=None):
        if nodes != "auto" and (not isinstance(nodes, int) or nodes < 1):
            raise ValueError(f"Interpolated(nodes=...) takes a positive int or 'auto', got {nodes!r}")
        if max_nodes < 4 or max_nodes & (max_nodes - 1):
            raise ValueError(f"max_nodes must be a power of two >= 4, got {max_nodes}")
        self.nodes, self.max_nodes, self.rtol, self.atol = nodes, max_nodes, rtol, atol

    def forward_pass(self, prob: Problem, y0):
        t_eval = prob.t_eval
        n_rec = self.max_nodes if self.nodes == "auto" else self.nodes
        grids = [chebyshev_points(n_rec, t_eval[i], t_eval[i + 1]) for i in range(len(t_eval) - 1)]
        queue = [(i, tau) for i, g in enumerate(grids) for tau in g]
        values = [[] for _ in grids]
        sign = 1.0 if t_eval[-1] >= t_eval[0] else -1.0
        pos = [0]

        def record(step):
            while pos[0] < len(queue) and sign * (queue[pos[0]][1] - step.t1) <= 0:
                i, tau = queue[pos[0]]
                values[i].append(step.evaluate(tau))
                pos[0] += 1

        res = record_forward(prob, y0, on_step=record)
        interps = []
        for i, vals in enumerate(values):
            v = torch.stack(vals)
            if self.nodes == "auto":
                v = self._choose(v, t_eval[i], t_eval[i + 1], prob.config.rtol, prob.config.atol)
            interps.append(BarycentricInterpolant(t_eval[i], t_eval[i + 1], v))
            prob.stats.interpolation_nodes.append(interps[-1].n)
        return torch.stack(res.ys), interps

    def _choose(self, v, t_a, t_b, rtol, atol):
        """Smallest nested sub-grid whose interpolant matches the recorded off-grid points."""
        n_max = self.max_nodes
        n = 4
        while n < n_max:
            stride = n_max // n
            interp = BarycentricInterpolant(t_a, t_b, v[::stride])
            fine = chebyshev_points(n_max, t_a, t_b)
            # Off-grid checks: odd points of the 2n grid, a few spread over the interval.
            odd = list(range(stride // 2, n_max, stride))
            picks = sorted({odd[k] for k in _spread(len(odd), 4)})
            worst = 0.0
            for j in picks:
                ref = v[j]
                scale = ref.abs().mul(rtol).add_(atol)
                err = torch.linalg.vector_norm((interp(fine[j]) - ref) / scale) / math.sqrt(ref.numel())
                worst = max(worst, float(err))
            if worst <= 1.0:
                return v[::stride].clone()
            n *= 2
        return v

    def backward_pass(self, prob: Problem, interps, ys, grad_ys):
        cfg = prob.adjoint_config.with_tolerances(self.rtol, self.atol)
        by_interval = {(interp.nodes[0], interp.nodes[-1]): interp for interp in interps}

        def z_for_interval(t_lo, t_hi):
            return by_interval[(t_lo, t_hi)]

        g_y0, g_p = adjoint_sweep(replace(prob, adjoint_config=cfg), grad_ys, z_for_interval,
                                  context="backward pass (interpolated)")
        return g_y0, unflatten_param_grads(g_p, prob.params)


def _spread(m: int, k: int) -> list:
    """``k`` indices spread evenly over ``range(m)``."""
    if m <= k:
        return list(range(m))
    return [round(i * (m - 1) / (k - 1)) for i in range(k)]
