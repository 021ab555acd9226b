"""Chebyshev points and barycentric Lagrange interpolation (Berrut & Trefethen, SIAM Rev. 2004)."""
from __future__ import annotations

import math

import torch

__all__ = ["chebyshev_points", "barycentric_weights", "BarycentricInterpolant"]


def chebyshev_points(n: int, t_a: float, t_b: float) -> list:
    """The ``n + 1`` Chebyshev points of the second kind (extrema, endpoints included) mapped onto
    the interval from ``t_a`` to ``t_b``, ordered from ``t_a`` to ``t_b``.

    Point ``j`` is ``mid - half * cos(j pi / n)``; the points for ``n`` are the even-indexed points
    for ``2n`` (the grids nest, which ``Interpolated(nodes="auto")`` relies on).
    """
    if n < 1:
        raise ValueError(f"need at least 2 Chebyshev points (n >= 1), got n={n}")
    mid, half = 0.5 * (t_a + t_b), 0.5 * (t_b - t_a)
    pts = [mid - half * math.cos(j * math.pi / n) for j in range(n + 1)]
    pts[0], pts[-1] = t_a, t_b
    return pts


def barycentric_weights(n: int) -> list:
    """Weights matching the second-kind points: ``(-1)**j``, halved at both ends.

    (The IRDM reference code pairs these points with first-kind weights, which turns the
    interpolant into a rational function and costs two orders of magnitude in accuracy.)
    """
    w = [(-1.0) ** j for j in range(n + 1)]
    w[0] *= 0.5
    w[-1] *= 0.5
    return w


class BarycentricInterpolant:
    """Polynomial interpolant through ``values[j]`` at the Chebyshev points of ``[t_a, t_b]``.

    Args:
        t_a, t_b: interval ends (either order).
        values: tensor ``(n + 1, N)``, the state at :func:`chebyshev_points` ``(n, t_a, t_b)``.

    ``__call__(t)`` evaluates formula (7) of the IRDM paper in O(n N): one weighted sum of rows.
    """

    def __init__(self, t_a: float, t_b: float, values: torch.Tensor):
        self.n = values.shape[0] - 1
        self.nodes = chebyshev_points(self.n, t_a, t_b)
        self.weights = barycentric_weights(self.n)
        self.values = values

    def coefficients(self, t: float) -> list:
        """Weights ``c`` (length ``n + 1``) with ``p(t) = sum_j c[j] values[j]`` (formula (7))."""
        # The interpolant is only meaningful on its interval (outside it the barycentric sums can
        # cancel to zero): clamp, as every caller integrates inside the interval.
        lo, hi = min(self.nodes[0], self.nodes[-1]), max(self.nodes[0], self.nodes[-1])
        t = min(max(t, lo), hi)
        ds = [t - tau for tau in self.nodes]
        if 0.0 in ds:
            j = ds.index(0.0)
            return [1.0 if k == j else 0.0 for k in range(self.n + 1)]
        # Every term is divided by the smallest |t - tau|: the common factor cancels, and w / d
        # cannot overflow when t is a subnormal distance from a node (a perturbed evaluation
        # next to t = 0 is 5e-324 from it, and w / 5e-324 = inf would turn p(t) into NaN).
        m = min(map(abs, ds))
        c = [w / (d / m) for w, d in zip(self.weights, ds)]
        s = sum(c)
        return [ci / s for ci in c]

    def __call__(self, t: float) -> torch.Tensor:
        """The interpolant at ``t`` (a Python float in the interval), shape ``(N,)``: one
        matrix-vector product over the nodes."""
        return self.evaluate_many([t])[0]

    def evaluate_many(self, ts) -> torch.Tensor:
        """The interpolant at several times, shape ``(K, N)``: one matrix product."""
        if len(ts) > 4:
            c = self.coefficient_matrix(ts).to(self.values.dtype)
        else:  # a few times: the Python loop is cheaper than the ~10 tensor ops
            c = torch.tensor([self.coefficients(t) for t in ts], dtype=self.values.dtype)
        return torch.mm(c.to(self.values.device, non_blocking=True), self.values)

    def coefficient_matrix(self, ts) -> torch.Tensor:
        """:meth:`coefficients` for every time in ``ts`` as one ``(K, n + 1)`` float64 CPU tensor,
        computed with tensor operations (the cost does not grow with ``K`` in Python)."""
        nodes = torch.tensor(self.nodes, dtype=torch.float64)
        lo, hi = min(self.nodes[0], self.nodes[-1]), max(self.nodes[0], self.nodes[-1])
        d = torch.tensor(ts, dtype=torch.float64).clamp_(lo, hi).unsqueeze(1) - nodes
        hit = d == 0.0  # t on a node: that node's value exactly
        # Scaled by the row's smallest |d| so that w / d never overflows (see coefficients).
        c = torch.tensor(self.weights, dtype=torch.float64) / (d / d.abs().amin(1, keepdim=True))
        c = c / c.sum(1, keepdim=True)
        return torch.where(hit.any(1, keepdim=True), hit.to(torch.float64), c)
