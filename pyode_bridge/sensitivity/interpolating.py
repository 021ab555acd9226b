"""``interpolating``: SciMLSensitivity's InterpolatingAdjoint - z(t) from the forward solver's
own dense output, optionally re-solved between checkpoints."""
from __future__ import annotations

import bisect
import math
from dataclasses import replace

from ..solvers import DenseSolution, DenseStep, PolynomialDenseStep, integrate
from ._adjoint import adjoint_sweep, keep_every, record_forward, unflatten_param_grads
from ._function import Saved
from .base import Problem, Sensitivity

__all__ = ["Interpolating"]


class Interpolating(Sensitivity):
    """Interpolating adjoint.

    ``checkpointing=False``: every accepted step's continuous extension is kept (compact
    polynomial form), and the backward reads ``z(t)`` from it. Memory O(Nt) states.

    ``checkpointing=True``: only the state at the start of every ``every``-th step and the step
    times are kept; during the backward each segment is re-solved forward on exactly the recorded
    step grid (bit-identical to the forward) to recover its dense output. Memory
    O(Nt / every) states + one segment's dense output; ``every=None`` uses ``ceil(sqrt(Nt))``.

    Args:
        rtol, atol: backward solve tolerances (default ``adjoint_rtol``/``adjoint_atol``, else the
            forward's).
    """

    name = "interpolating"

    def __init__(self, checkpointing: bool = False, every: int | None = None, rtol=None, atol=None):
        if every is not None and int(every) < 1:
            raise ValueError(f"Interpolating(every={every}): every must be a positive integer")
        self.checkpointing, self.every, self.rtol, self.atol = bool(checkpointing), every, rtol, atol

    def forward_pass(self, prob: Problem, y0):
        if not self.checkpointing:
            tensors, meta = [], []

            def keep(step):
                c = step.compact()
                if isinstance(c, PolynomialDenseStep):
                    tensors.extend([c.y0, c.y1, *c.q])
                    meta.append((c.t0, c.h, len(c.q)))
                else:  # an extension of its own (scipy's): kept as the object
                    meta.append(c)

            res = record_forward(prob, y0, on_step=keep)
            return res.stacked(), Saved(tensors, meta)
        starts = []
        # With every=None the step count, hence sqrt(Nt), is only known at the end: all step
        # starts are held until then (transiently, without a graph) and thinned afterwards.
        res = record_forward(prob, y0, on_step=keep_every(self.every or 1, starts))
        every = self.every or max(1, math.ceil(math.sqrt(len(starts))))
        return res.stacked(), Saved(starts if self.every else starts[::every], (res.step_times, every))

    def backward_pass(self, prob: Problem, saved, ys, grad_ys):
        prob = replace(prob, adjoint_config=prob.adjoint_config.with_tolerances(self.rtol, self.atol))
        if not self.checkpointing:
            dense, i = DenseSolution(), 0
            for m in saved.meta:
                if isinstance(m, DenseStep):
                    dense.append(m)
                    continue
                t0, h, n_q = m
                v = saved.tensors[i:i + 2 + n_q]
                dense.append(PolynomialDenseStep(t0, h, v[0], v[1], list(v[2:])))
                i += 2 + n_q
            g_y0, g_p = adjoint_sweep(prob, grad_ys, lambda lo, hi: dense,
                                      context="backward pass (interpolating)")
            return g_y0, unflatten_param_grads(g_p, prob.params)

        states, (step_times, every) = saved.tensors, saved.meta
        seg_starts = step_times[::every][:len(states)]
        sign = 1.0 if prob.t_eval[-1] >= prob.t_eval[0] else -1.0
        keys = [sign * t for t in seg_starts]
        cache = {}

        def z_for_interval(t_lo, t_hi):
            s = max(0, bisect.bisect_right(keys, sign * t_lo) - 1)
            if s not in cache:
                cache.clear()  # one segment's dense output at a time
                grid = step_times[s * every:(s + 1) * every + 1]
                dense = DenseSolution()
                integrate(prob.rhs, states[s], [grid[0], grid[-1]], prob.config.replay(grid),
                          on_step=lambda st: dense.append(st.compact()),
                          context="backward pass (interpolating, re-solve)")
                cache[s] = dense
            return cache[s]

        g_y0, g_p = adjoint_sweep(prob, grad_ys, z_for_interval, extra_breaks=seg_starts[1:],
                                  context="backward pass (interpolating)")
        return g_y0, unflatten_param_grads(g_p, prob.params)
