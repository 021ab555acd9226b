"""``interpolating``: SciMLSensitivity's InterpolatingAdjoint - z(t) from the forward solver's
own dense output, optionally re-solved between checkpoints."""
from __future__ import annotations

import bisect
import math
from dataclasses import replace

import torch

from .._types import FlatState, FlatTrajectory, Gradients
from ..solvers import DenseSolution, DenseStep, PolynomialDenseStep, integrate
from ._adjoint import adjoint_sweep, keep_every, record_forward
from ._function import Saved
from .base import BackwardMemory, Problem, SolveSize, TwoPassSensitivity, check_policy, guard_alarm

__all__ = ["Interpolating"]


#: Interpolating's default guard threshold: the dense output's measured error, relative to the
#: state, above which the gradient may be more than 1% off (calibration: benchmarks/README.md).
GUARD_RTOL = 1e-2


class _DenseOutputWatch:
    """An ``on_step`` callback measuring each step's dense output before handing the step on to
    ``on_step``: its ``interpolation_check`` relative to the state component by component (to the
    largest ``|z_i|`` so far), the RMS over the components, weighted by the step's share of the
    solve's time span.

    Component by component, because a small component can carry the Jacobian (Robertson's y2,
    3.6e-5 next to y1 ~ 1, enters it through 6e7 y2). RMS, not the largest, as the solver's error
    norm: a batch of 100 states whose one entry crosses zero inside a step is not flagged for it
    (a max over entries flagged an rk4 MLP classifier whose gradient is right to 3e-5). Weighted by
    time, because the adjoint integrates ``a^T df/dz`` at ``z(t)`` over time: ``z`` off by 90%
    within one step of 200 (Robertson's transient stepped over by radauIIA5 at 0.05) moves
    dL/dy0 by 7e-4, the same error over the whole span by the order of itself. The weighted
    ratios stay on the device, read once by :meth:`result`."""

    def __init__(self, atol: float, on_step):
        self.atol, self.on_step = atol, on_step
        self.parts: list[torch.Tensor] = []
        self.spans: list[tuple[float, float]] = []
        self.peak = None  # per component, the largest |z_i| so far

    def __call__(self, step):
        d = step.interpolation_check()
        if d is not None:
            # To the component's size so far, not at this step: a component crossing zero is
            # measured against its amplitude.
            scale = torch.maximum(step.y0.abs(), step.y1.abs())
            self.peak = scale if self.peak is None else torch.maximum(self.peak, scale)
            # Entries at round-off level next to the state's largest are not measured relatively.
            floor = self.peak.max() * (1e3 * torch.finfo(scale.dtype).eps) + self.atol
            rms = torch.linalg.vector_norm(d / (self.peak + floor)) / math.sqrt(d.numel())
            self.parts.append(rms * abs(step.h))
            self.spans.append((step.t0, step.t1))
        return self.on_step(step)

    def result(self):
        """``(figure or None, (t0, t1) of the step contributing most)``: the time average of the
        steps' relative errors (one host sync; NaN stays NaN)."""
        if not self.parts:
            return None, (None, None)
        parts = torch.stack(self.parts)
        span = abs(self.spans[-1][1] - self.spans[0][0])
        i = int(torch.where(torch.isnan(parts), torch.full_like(parts, math.inf), parts).argmax())
        return float(parts.sum()) / span, self.spans[i]


class Interpolating(TwoPassSensitivity):
    """Interpolating adjoint.

    ``checkpointing=False``: every accepted step's continuous extension is kept (compact
    polynomial form), and the backward reads ``z(t)`` from it. Memory O(Nt) states.

    ``checkpointing=True``: only the state at the start of every ``every``-th step and the step
    times are kept; during the backward each segment is re-solved forward on exactly the recorded
    step grid to recover its dense output: bit-identical to the forward, except that a tableau
    that carries its last stage (``adaptive_heun``, ``fehlberg2``) starts a segment from
    ``f(t0, z)``, not from the carried stage, and differs from there by round-off to local-error
    size. Memory
    O(Nt / every) states + one segment's dense output; ``every=None`` uses ``ceil(sqrt(Nt))``.

    The dense output is always checked: on every step it is compared with an independent
    estimate of the same step (:meth:`~pyode_bridge.solvers.DenseStep.interpolation_check`: for
    Radau IIA and Gauss-Legendre the stage polynomial one degree lower, for dopri5/tsit5/dopri8
    the step's embedded error estimate, for cubic Hermite the embedded quadratics), with no
    function evaluation beyond, at most, the last step's end derivative. Per step the distance,
    relative to the state component by component (to the largest ``|z_i|`` so far, plus
    ``atol``) and RMS over the components, is weighted by the step's share of the time span;
    ``stats.dense_output_error`` is the sum, the time average of the relative error of ``z`` as
    the adjoint integrates over it. Above ``guard_rtol`` the steps do
    not resolve ``z`` - a stiff transient inside fixed steps, steps too long for the trajectory -
    and the gradient may be off by more than 1%: ``on_inaccuracy`` decides whether to warn
    (default), raise :class:`~pyode_bridge.SolverError`, or ignore. Steps of scipy's solvers and
    ``interp="linear"`` are not measured (the figure stays None if no step is). The guard sees
    the interpolant only, not the backward solve's own truncation error on a fixed grid.

    Args:
        rtol, atol: backward solve tolerances (default ``adjoint_rtol``/``adjoint_atol``, else the
            forward's).
        on_inaccuracy: ``"warn"``, ``"raise"`` or ``"ignore"`` when the dense output's measured
            error exceeds ``guard_rtol``.
        guard_rtol: the time-averaged relative dense-output error above which the guard acts.
    """

    name = "interpolating"
    per_sample = "dense"

    def __init__(self, checkpointing: bool = False, every: int | None = None, rtol: float | None = None,
                 atol: float | None = None, on_inaccuracy: str = "warn", guard_rtol: float = GUARD_RTOL):
        if every is not None and int(every) < 1:
            raise ValueError(f"Interpolating(every={every}): every must be a positive integer")
        self.checkpointing, self.every, self.rtol, self.atol = bool(checkpointing), every, rtol, atol
        self.on_inaccuracy = check_policy("on_inaccuracy", on_inaccuracy)
        self.guard_rtol = float(guard_rtol)

    def predict_backward_bytes(self, size: SolveSize, *, nodes: int | str | None = None,
                               every: int | None = None, checkpointing: bool | None = None
                               ) -> BackwardMemory:
        """The dense output besides the outputs: ``N + 1`` states and ``P`` polynomial coefficients
        per step. With ``checkpointing``: ``ceil(N / k)`` states (``k = ceil(sqrt(N))`` by default)
        and one segment's dense output during the backward. Backward transient: one VJP graph
        ``g`` and the adjoint solve's workspace."""
        ck = self.checkpointing if checkpointing is None else bool(checkpointing)
        s, N, T, P = size.state_bytes, size.steps, size.n_outputs, size.dense_coeffs
        transient = size.eval_saved_bytes + size.adjoint_work_bytes
        if not ck:
            n_st = (N + 1) + N * P if N else 1
            kept = size.outputs_bytes + n_st * s
            return BackwardMemory(self.name, kept, kept + transient, f"({T} + {N + 1} + {N}x{P}) s + g")
        k = int(every if every is not None else (self.every or max(1, math.ceil(math.sqrt(max(N, 1))))))
        n_ck = math.ceil(N / k) if N else 0
        kept = size.outputs_bytes + n_ck * s
        seg = (k + 1 + k * P) * s
        return BackwardMemory(self.name + " (checkpointing)", kept, kept + seg + transient,
                              f"({T} + {n_ck}) s + ({k + 1 + k * P}) s + g")

    def sciml_counterpart(self) -> tuple[str, dict]:
        """SciMLSensitivity's InterpolatingAdjoint (``checkpointing`` and tolerances carry over)."""
        if self.every is not None:
            raise ValueError("Interpolating(every=...) has no counterpart in SciMLSensitivity; "
                             "use Interpolating(checkpointing=True) (checkpoints at the output "
                             "times) with backend='julia'")
        return "interpolating", {"checkpointing": self.checkpointing, "rtol": self.rtol, "atol": self.atol}

    def forward_pass(self, prob: Problem, y0: FlatState) -> tuple[FlatTrajectory, Saved]:
        tensors: list = []  # the dense output's, or (checkpointing) the step starts
        meta: list = []

        def keep(step):
            c = step.compact()
            if isinstance(c, PolynomialDenseStep):
                tensors.extend([c.y0, c.y1, *c.q])
                meta.append((c.t0, c.h, len(c.q)))
            else:  # an extension of its own (scipy's): kept as the object
                meta.append(c)

        # With every=None the step count, hence sqrt(Nt), is only known at the end: all step
        # starts are held until then (transiently, without a graph) and thinned afterwards.
        watch = _DenseOutputWatch(prob.config.control.atol,
                                  keep_every(self.every or 1, tensors) if self.checkpointing else keep)
        res = record_forward(prob, y0, on_step=watch)
        self._guard(prob, watch)
        if not self.checkpointing:
            return res.stacked(), Saved(tensors, meta)
        every = self.every or max(1, math.ceil(math.sqrt(len(tensors))))
        return res.stacked(), Saved(tensors if self.every else tensors[::every], (res.step_times, every))

    def _guard(self, prob: Problem, watch) -> None:
        worst, (t0, t1) = watch.result()
        prob.stats.dense_output_error = worst
        if worst is None or (worst <= self.guard_rtol and not math.isnan(worst)):
            return
        cfg = prob.config
        fix = ("tighter rtol/atol or a smaller max_step" if cfg.adaptive else
               "a smaller step_size (or a finer grid)")
        msg = (f"forward solve with method '{cfg.method.name}' (interpolating): the dense output, "
               f"from which the backward reads z, misses an independent interpolant of its steps by "
               f"{worst:.3g} relative to the state, averaged over time (guard_rtol="
               f"{self.guard_rtol:g}), most on the step from t={t0:.6g} to t={t1:.6g}: the steps do "
               f"not resolve z, and the gradient may be off by more than 1%. Use {fix} there, or "
               "sensitivity='checkpointed' (the exact gradient of the solve).")
        guard_alarm(self.on_inaccuracy, msg, stacklevel=5)

    def backward_pass(self, prob: Problem, saved: Saved, ys: FlatTrajectory, grad_ys: FlatTrajectory) -> Gradients:
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
            return adjoint_sweep(prob, grad_ys, lambda lo, hi: dense, context="backward pass (interpolating)")

        states, (step_times, every) = saved.tensors, saved.meta
        seg_starts = step_times[::every][:len(states)]
        sign = 1.0 if prob.t_eval[-1] >= prob.t_eval[0] else -1.0
        keys = [sign * t for t in seg_starts]
        cache: dict = {}

        def z_for_interval(t_lo, t_hi):
            s = max(0, bisect.bisect_right(keys, sign * t_lo) - 1)
            if s not in cache:
                cache.clear()  # one segment's dense output at a time
                grid = step_times[s * every:(s + 1) * every + 1]
                dense = DenseSolution()
                # exact: the re-solve carries stages as the forward did (adaptive_heun, fehlberg2:
                # one evaluation per step fewer); its first step starts from f(t0, z), not carried.
                integrate(prob.rhs, states[s], [grid[0], grid[-1]], prob.config.replay(grid, exact=True),
                          on_step=lambda st: dense.append(st.compact()),
                          context="backward pass (interpolating, re-solve)")
                cache[s] = dense
            return cache[s]

        return adjoint_sweep(prob, grad_ys, z_for_interval, extra_breaks=seg_starts[1:],
                             context="backward pass (interpolating)")
