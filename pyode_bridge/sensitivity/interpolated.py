"""``interpolated``: IRDM (Daulbaev et al., NeurIPS 2020) - z(t) by barycentric Lagrange
interpolation on Chebyshev grids recorded from the forward's dense output, with a guard that
measures the interpolant against the dense output."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from .._types import FlatState, FlatTrajectory, Gradients
from ..solvers.boundaries import merge_times, stops_between
from ._adjoint import adjoint_sweep, record_forward
from ._function import Saved
from .base import BackwardMemory, Problem, SolveSize, TwoPassSensitivity, check_policy, guard_alarm
from .bli import BarycentricInterpolant, chebyshev_points

__all__ = ["Interpolated"]

_N_CHECKS = 8  # off-grid points per output interval at which the interpolant is measured


class Interpolated(TwoPassSensitivity):
    """Interpolated reverse dynamic method.

    Forward: the state at ``nodes + 1`` Chebyshev points of every output interval is read from the
    solver's dense output as the steps pass them (no extra function evaluations), together with
    the state at a few off-grid points. Backward: only ``[a, dL/dtheta]`` is solved backwards, with
    ``z(t)`` rebuilt by barycentric interpolation. Memory: O(L) + O(nodes) states per interval.

    The interpolant is always checked: on every output interval it is compared with the dense
    output at off-grid points (RMS of the difference scaled by ``atol + rtol |z|``, the solver's
    own error measure). ``stats.interpolation_error`` is the largest such ratio, and where it
    exceeds ``guard_factor`` the gradient may be off by more than the solver tolerance suggests:
    ``on_inaccuracy`` decides whether to warn (default), raise
    :class:`~pyode_bridge.SolverError`, or ignore.

    Args:
        nodes: polynomial degree per output interval (``nodes + 1`` points, endpoints included),
            or ``"auto"`` (default): record ``max_nodes`` and keep, per interval, the smallest of
            4, 8, 16, ... whose interpolant matches the dense output at off-grid points within
            the tolerance (the counts are in ``stats.interpolation_nodes``).
        max_nodes: the recording grid for ``"auto"`` (a power of two >= 4). More resolves faster
            trajectories per interval; so do more output times in ``t``.
        rtol, atol: backward solve tolerances (default: ``adjoint_rtol``/``adjoint_atol``, else the
            forward's).
        on_inaccuracy: ``"warn"``, ``"raise"`` or ``"ignore"`` when the interpolation error ratio
            exceeds ``guard_factor``.
        guard_factor: how many times the tolerance the interpolation error may reach. The
            reference, the solver's dense output, is itself up to ~20 tolerances off the solution
            at tight tolerances (dopri5's 4th-order extension), so below that the guard measures
            the reference, not the interpolant: 100 keeps right gradients quiet (measured up to
            43 with the gradient as accurate as checkpointed's or twice the nodes') while the
            misses that cost the gradient measure 1e3-1e9 (benchmarks/README.md, "Work-precision").
    """

    name = "interpolated"
    per_sample = "chebyshev"

    def __init__(self, nodes: int | str = "auto", max_nodes: int = 64, rtol: float | None = None,
                 atol: float | None = None, on_inaccuracy: str = "warn", guard_factor: float = 100.0):
        if nodes != "auto" and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise ValueError(f"Interpolated(nodes=...) takes a positive int or 'auto', got {nodes!r}")
        if not isinstance(max_nodes, int) or max_nodes < 4 or max_nodes & (max_nodes - 1):
            raise ValueError(f"max_nodes must be a power of two >= 4, got {max_nodes!r}")
        self.nodes, self.max_nodes, self.rtol, self.atol = nodes, max_nodes, rtol, atol
        self.on_inaccuracy = check_policy("on_inaccuracy", on_inaccuracy)
        self.guard_factor = float(guard_factor)

    def predict_backward_bytes(self, size: SolveSize, *, nodes: int | str | None = None,
                               every: int | None = None, checkpointing: bool | None = None
                               ) -> BackwardMemory:
        """``n + 1`` Chebyshev node states per output interval besides the outputs (``nodes="auto"``:
        at most ``max_nodes + 1``); backward transient: one VJP graph ``g`` and the adjoint solve's
        workspace."""
        n = nodes if nodes is not None else self.nodes
        if n == "auto":
            n = self.max_nodes
        T = size.n_outputs
        per = (T - 1) * (int(n) + 1)
        kept = size.outputs_bytes + per * size.state_bytes
        return BackwardMemory(self.name, kept, kept + size.eval_saved_bytes + size.adjoint_work_bytes,
                              f"({T} + {per}) s + g")

    def forward_pass(self, prob: Problem, y0: FlatState) -> tuple[FlatTrajectory, Saved]:
        cfg = prob.config
        # One interpolant per output interval, split at the jumps of func (z has a kink there).
        t_eval = _breaks(prob)
        n_rec = self.max_nodes if self.nodes == "auto" else int(self.nodes)
        sign = 1.0 if t_eval[-1] >= t_eval[0] else -1.0
        # Per interval: the Chebyshev nodes, then off-grid check points (odd points of the grid of
        # twice the degree), all read from the dense output in time order.
        plans = []
        queue: list = []
        for i in range(len(t_eval) - 1):
            nodes = chebyshev_points(n_rec, t_eval[i], t_eval[i + 1])
            fine = chebyshev_points(2 * n_rec, t_eval[i], t_eval[i + 1])
            checks = [fine[2 * j + 1] for j in _spread(n_rec, _N_CHECKS)]
            plans.append((nodes, checks))
            queue.extend((sign * tau, i, 0, j, tau) for j, tau in enumerate(nodes))
            queue.extend((sign * tau, i, 1, j, tau) for j, tau in enumerate(checks))
        queue.sort(key=lambda e: (e[0], e[1]))
        got = [([None] * len(nodes), [None] * len(checks)) for nodes, checks in plans]
        remaining = [len(nodes) + len(checks) for nodes, checks in plans]
        kept: list[Any]  # one node tensor per interval, filled as the intervals finish
        kept, chosen, errors = [None] * len(plans), [0] * len(plans), [0.0] * len(plans)
        pos = [0]

        def finish(i):
            nodes, checks = plans[i]
            v, c = torch.stack(got[i][0]), torch.stack(got[i][1])
            n, err = self._choose(v, c, checks, t_eval[i], t_eval[i + 1], cfg.control.rtol, cfg.control.atol)
            kept[i], chosen[i], errors[i] = v[::n_rec // n].clone(), n, err
            got[i] = None  # the full recording of this interval is no longer needed

        last: list = []

        def record(step, final: bool = False):
            last[:] = [step]
            batch = []
            while pos[0] < len(queue) and (final or sign * (queue[pos[0]][4] - step.t1) <= 0):
                batch.append(queue[pos[0]])
                pos[0] += 1
            if not batch:
                return
            values = step.evaluate_many([e[4] for e in batch])
            for (_, i, kind, j, _), v in zip(batch, values):
                got[i][kind][j] = v
                remaining[i] -= 1
                if remaining[i] == 0:
                    finish(i)

        res = record_forward(prob, y0, on_step=record)
        if pos[0] < len(queue) and last:
            # The last step's t0 + h can fall an ulp short of the end time: the nodes there are its.
            record(last[0], final=True)
        prob.stats.interpolation_nodes.extend(chosen)
        worst = max(errors) if errors else 0.0
        prob.stats.interpolation_error = worst
        self._guard(errors, chosen, t_eval, cfg)
        return res.stacked(), Saved(kept, [(t_eval[i], t_eval[i + 1]) for i in range(len(kept))])

    def _choose(self, v, checks, taus, t_a, t_b, rtol, atol):
        """``(n, error ratio)``: the degree kept for one interval and its measured error.

        ``v`` holds the recorded values at the ``n_rec``-grid, ``checks`` those at the off-grid
        points ``taus``. With ``nodes="auto"`` the smallest nested sub-grid whose interpolant matches
        recorded points it does not use (within the tolerance) is kept; the full grid is measured
        against the check points."""
        n_rec = v.shape[0] - 1
        if self.nodes == "auto":
            fine = chebyshev_points(n_rec, t_a, t_b)
            n = 4
            while n < n_rec:
                stride = n_rec // n
                interp = BarycentricInterpolant(t_a, t_b, v[::stride])
                odd = list(range(stride // 2, n_rec, stride))  # off the sub-grid, on the record
                picks = sorted({odd[k] for k in _spread(len(odd), _N_CHECKS)})
                err = _ratio(interp.evaluate_many([fine[j] for j in picks]), v[picks], rtol, atol)
                if err <= 1.0:
                    return n, err
                n *= 2
        interp = BarycentricInterpolant(t_a, t_b, v)
        return n_rec, _ratio(interp.evaluate_many(taus), checks, rtol, atol)

    def _guard(self, errors, chosen, t_eval, cfg):
        if self.on_inaccuracy == "ignore" or not errors:
            return
        i = max(range(len(errors)), key=lambda k: errors[k])
        if errors[i] <= self.guard_factor and not math.isnan(errors[i]):
            return
        fix = ("raise max_nodes (Interpolated(max_nodes=128)) or " if self.nodes == "auto" else
               "use nodes='auto' or more nodes, ")
        msg = (f"forward solve with method '{cfg.method.name}' (interpolated): the Chebyshev "
               f"interpolant of z on [{t_eval[i]:.6g}, {t_eval[i + 1]:.6g}] with {chosen[i]} nodes "
               f"misses the solver's dense output by {errors[i]:.3g} times the tolerance "
               f"(rtol={cfg.control.rtol:g}, atol={cfg.control.atol:g}); the gradient may be off by more "
               f"than the tolerance suggests. {fix[0].upper() + fix[1:]}add output times inside the interval, "
               "or use sensitivity='checkpointed' (exact) or 'interpolating'.")
        guard_alarm(self.on_inaccuracy, msg, stacklevel=5)

    def backward_pass(self, prob: Problem, saved: Saved, ys: FlatTrajectory, grad_ys: FlatTrajectory) -> Gradients:
        cfg = prob.adjoint_config.with_tolerances(self.rtol, self.atol)
        by_interval = {(t_a, t_b): BarycentricInterpolant(t_a, t_b, v)
                       for v, (t_a, t_b) in zip(saved.tensors, saved.meta)}
        return adjoint_sweep(replace(prob, adjoint_config=cfg), grad_ys, lambda lo, hi: by_interval[(lo, hi)],
                             extra_breaks=_breaks(prob)[1:-1], context="backward pass (interpolated)")


def _breaks(prob: Problem) -> list:
    """The output times with the forward's ``jump_t`` inside them added, in time order."""
    t_eval = prob.t_eval
    return merge_times(t_eval, stops_between(prob.config.time.jump_t, t_eval[0], t_eval[-1]))


def _ratio(approx, ref, rtol, atol) -> float:
    """The largest over rows ``(K, N)`` of the RMS error scaled by ``atol + rtol |ref|`` (one sync)."""
    scaled = (approx - ref) / ref.abs().mul(rtol).add_(atol)
    return float((torch.linalg.vector_norm(scaled, dim=1) / math.sqrt(ref.shape[1])).max())


def _spread(m: int, k: int) -> list:
    """``k`` indices spread evenly over ``range(m)``."""
    if m <= k:
        return list(range(m))
    return [round(i * (m - 1) / (k - 1)) for i in range(k)]
