"""``backsolve``: the reverse dynamic method (RDM) of Chen et al. (2018), with a stability guard."""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .._types import FlatState, FlatTrajectory, Gradients, Quadrature
from ..errors import SolverError
from ._adjoint import VJP, adjoint_sweep, record_forward
from ._function import Saved
from .base import BackwardMemory, Problem, SolveSize, TwoPassSensitivity, check_policy, guard_alarm

__all__ = ["Backsolve"]


class Backsolve(TwoPassSensitivity):
    """Solve ``[z, a, dL/dtheta]`` backwards from the final state: O(L) memory, no stored
    trajectory, but the reverse solve of ``z`` can be unstable (ANODE, Gholami et al. 2019).

    The guard estimates what the reverse-solved ``z`` drifting from the forward's costs the
    gradient. At every output time, where ``z`` is compared with the forward's stored state, the
    adjoint's and the parameter integral's integrands are evaluated at both states, and their
    difference, integrated over the interval as the drift grows, is taken relative to the adjoint
    and to ``|dL/dtheta|``. ``stats.backsolve_error`` is that estimate: the relative error of the
    gradient ``[dL/dy0, dL/dtheta]`` (0.01 = 1%; relative to the gradient computed, so a figure
    near 1 or above means it is mostly error). It is not a count of tolerances, so it means the
    same for fixed steps. Calibrated on stiff, oscillatory and neural vector fields in float32 and
    float64, adaptive and fixed steps (``benchmarks/calibrate_backsolve_guard.py``), it came
    within 0.9x-2.9x of the real error wherever the drift was the error's cause. Not in it: on a
    fixed grid, the adjoint's own discretisation error (every adjoint method has it; the forward
    solve on that grid is about as far from the exact solution).

    Cost: an adaptive solve whose reverse-solved ``z`` meets the forward's state within the
    tolerance (``atol + rtol |z|``, every entry) pays nothing there (what is left is the
    tolerance's error, which every method shares); elsewhere one vector-Jacobian product per
    output interval with an FSAL method (dopri5, bosh3, tsit5), two otherwise.

    Args:
        rtol, atol: tolerances of the backward solve (default: ``adjoint_rtol``/``adjoint_atol``,
            else the forward's).
        on_instability: what to do when the estimate exceeds ``max_error`` (or is NaN):
            ``"warn"`` (default), ``"raise"`` (:class:`~pyode_bridge.SolverError`) or ``"ignore"``
            (which also skips the estimate: ``stats.backsolve_error`` stays None).
        max_error: the estimated relative gradient error above which the guard fires. The default
            0.5% is set so that gradients more than 1% off warn and those within 0.1% stay quiet:
            the estimate was 0.95x-2.9x the real error on the calibration family, and overshoots
            more (up to 17x) at loose tolerances where z barely matters to the gradient
            (benchmarks/README.md, "Backsolve guard calibration").
        remedy: the advice the warning or error ends with (default: pyode-bridge's options; the
            torchdiffeq drop-in passes advice in its own API).
    """

    name = "backsolve"
    per_sample = "backsolve"

    def __init__(self, rtol: float | None = None, atol: float | None = None, on_instability: str = "warn",
                 max_error: float = 5e-3, remedy: str | None = None):
        check_policy("on_instability", on_instability)
        max_error = float(max_error)
        if not max_error > 0:
            raise ValueError(f"Backsolve(max_error=...) must be a positive relative error, got {max_error!r}")
        self.rtol, self.atol = rtol, atol
        self.on_instability, self.max_error, self.remedy = on_instability, max_error, remedy

    def predict_backward_bytes(self, size: SolveSize, *, nodes: int | str | None = None,
                               every: int | None = None, checkpointing: bool | None = None
                               ) -> BackwardMemory:
        """Nothing but the outputs; backward transient: one VJP graph ``g`` and the workspace of
        the backward solve of ``[z, a]`` (twice an adjoint solve's)."""
        kept = size.outputs_bytes
        return BackwardMemory(self.name, kept, kept + size.eval_saved_bytes + 2 * size.adjoint_work_bytes,
                              f"{size.n_outputs} s + g")

    def sciml_counterpart(self) -> tuple[str, dict]:
        """SciMLSensitivity's BacksolveAdjoint (tolerances carry over; the stability guard has no
        counterpart there)."""
        if (self.on_instability != "warn" or self.max_error != Backsolve().max_error
                or self.remedy is not None):
            raise ValueError("Backsolve(on_instability=..., max_error=..., remedy=...) are torch-backend "
                             "options; with backend='julia' BacksolveAdjoint re-anchors the state "
                             "at the output times instead (checkpointing=True)")
        return "backsolve", {"rtol": self.rtol, "atol": self.atol}

    def forward_pass(self, prob: Problem, y0: FlatState) -> tuple[FlatTrajectory, Saved]:
        res = record_forward(prob, y0)
        return res.stacked(), Saved()

    def backward_pass(self, prob: Problem, saved: Saved, ys: FlatTrajectory, grad_ys: FlatTrajectory) -> Gradients:
        t_eval, N = prob.t_eval, ys.shape[1]
        prob = replace(prob, adjoint_config=prob.adjoint_config.with_tolerances(self.rtol, self.atol))
        cfg, c = prob.adjoint_config, prob.adjoint_config.control
        guarded = self.on_instability != "ignore"
        vjp = VJP(prob)
        out_index = {t: i for i, t in enumerate(t_eval)}
        costs = []  # (da, dq, |a|, t) at each output time the reverse solve reaches
        q_end: list = [None]

        def price(t_hi: float, t_lo: float, za: FlatState, q: Quadrature | None, last: list) -> None:
            q_end[0] = q
            if not guarded:
                return
            z_fwd = ys[out_index[t_lo]]
            if cfg.adaptive and _within_tolerance(za[:N], z_fwd, za[N:], c.rtol, c.atol):
                # The reverse solve met the forward's state as closely as the solver's own
                # tolerance allows: what is left is the tolerance's error, which every method
                # shares, not backsolve's (and stable problems pay nothing for the guard).
                costs.append((0.0, 0.0, 0.0, t_lo))
                return
            at_back = last[2] if last and last[0] == t_lo and torch.equal(last[1], za) else None
            costs.append(_drift_cost(vjp, t_lo, abs(t_hi - t_lo), za[:N], z_fwd, za[N:], at_back) + (t_lo,))

        context = "backward pass (backsolve)"
        try:
            a, grads = adjoint_sweep(prob, grad_ys, ys, context=context, vjp=vjp, after_interval=price)
        except SolverError as e:
            raise SolverError(f"{e} The reverse solve of z is unstable here (ANODE's failure "
                              f"mode). {self._remedy(cfg)}") from e
        if guarded:
            worst, worst_t = _gradient_error(costs, q_end[0])
            prob.stats.backsolve_error = worst
            self._guard(worst, worst_t, cfg, t_eval, context, cfg.method.name)
        return a, grads

    def _remedy(self, cfg) -> str:
        if self.remedy is not None:
            return self.remedy
        finer = "Tighten rtol/atol" if cfg.adaptive else "Take smaller steps"
        return (f"{finer} (the drift scales with them), add output times to t (z restarts from "
                "the forward's state at each), or use sensitivity='checkpointed' (exact for the "
                "computed solution) or 'interpolated', which do not solve z backwards.")

    def _guard(self, worst, worst_t, cfg, t_eval, context, method):
        if not (worst > self.max_error or math.isnan(worst)):
            return
        size = "a NaN" if math.isnan(worst) else f"about {100 * worst:.3g}%"
        msg = (f"{context} with method '{method}': the reverse-solved state drifts from the "
               f"forward's (most costly at t={worst_t:.6g}; solve on [{t_eval[0]:g}, "
               f"{t_eval[-1]:g}]), which puts the gradient's relative error at {size} "
               f"(estimated; the guard fires above {100 * self.max_error:g}%): the backward "
               f"solve of z is unstable and the gradient is unreliable. {self._remedy(cfg)}")
        guard_alarm(self.on_instability, msg, stacklevel=3)


def _drift_cost(vjp, t: float, h: float, z_back, z_fwd, a, at_back=None):
    """``(da, dq, |a|)``: what the reverse-solved state's drift at the end ``t`` of an output
    interval of length ``h`` costs the adjoint ``a`` and the parameter integral over that interval.

    Both integrate ``-a^T df/dz`` and ``-a^T df/dtheta`` along the reverse-solved ``z``; where it
    has drifted from the forward's, each integrand is off by the difference of the two products
    at ``z_back`` and at ``z_fwd`` (exact in the drift, not a linearisation). ``at_back``: the
    products at ``z_back`` where the backward solve already has them (an FSAL tableau's last
    stage), else one more VJP.

    That difference is zero where ``z`` restarts (the interval's other end) and is taken to grow
    backwards in time at the rate of the drift ``dz = z_back - z_fwd`` plus that of ``a``, each
    from its Rayleigh quotient (``-<dz, f(z_back) - f(z_fwd)> / |dz|^2`` and
    ``<a, J^T a> / |a|^2``): a rotating drift grows at its decay rate, not at its frequency, and
    where ``a`` decays backwards as fast as the drift grows (a linear decay) their product does
    not grow at all. Its integral over the interval is its value at ``t`` times
    ``(1 - exp(-lam h)) / lam``: ``h`` for a slow growth, ``1/lam`` for a fast one."""
    diff = z_back - z_fwd
    a_norm, dz = torch.stack([torch.linalg.vector_norm(a), torch.linalg.vector_norm(diff)]).tolist()
    if dz == 0.0 or a_norm == 0.0:
        return 0.0, 0.0, a_norm
    if not math.isfinite(dz):
        return math.nan, math.nan, a_norm
    neg_a = torch.neg(a)
    f_b, gz_b, gp_b = at_back if at_back is not None else vjp(t, z_back, neg_a)
    f_f, gz_f, gp_f = vjp(t, z_fwd, neg_a)
    # One host sync for the four figures (gz_f = -J^T a).
    dot_z, dot_a, d_gz, d_gp = torch.stack([
        torch.dot(diff.reshape(-1), (f_b - f_f).reshape(-1)), torch.dot(a.reshape(-1), gz_f.reshape(-1)),
        torch.linalg.vector_norm(gz_b - gz_f), torch.linalg.vector_norm(gp_b - gp_f)]).tolist()
    length = _effective_length(-dot_z / dz ** 2 - dot_a / a_norm ** 2, h)
    return d_gz * length, d_gp * length, a_norm


def _within_tolerance(z_back, z_fwd, a, rtol: float, atol: float) -> bool:
    """Whether every entry of the reverse-solved state is within ``atol + rtol |z|`` of the
    forward's, with a finite adjoint ``a`` (False where anything is NaN: that must be priced)."""
    close = (z_back - z_fwd).abs() <= z_fwd.abs().mul(rtol).add_(atol)
    return bool(close.all() & torch.isfinite(a).all())


def _effective_length(lam: float, h: float) -> float:
    """``integral_0^h exp(-lam s) ds``: the integrand's error, largest at the interval's end, fades
    towards the restart at the rate ``lam``."""
    x = lam * h
    if not math.isfinite(x):
        return 0.0 if math.isinf(x) and x > 0 else h
    # An error that does not grow backwards (an expanding forward flow, or a drift that only
    # collects local errors) is counted over the full interval: never more.
    return h if x < 1e-8 else h * -math.expm1(-x) / x


def _gradient_error(costs, q_end):
    """The estimated relative error of the gradient, and the output time that contributes most.

    ``costs``: per output interval, in the order of the backward sweep, ``(da, dq, |a|, t)`` from
    :func:`_drift_cost`. An error ``da`` in the adjoint at ``t`` is taken to stay the same fraction
    of the adjoint back to ``t_0`` (both are carried by the same linear adjoint flow): that
    fraction is its share of the error of ``dL/dy0``, and at most its share of the error of the
    parameter integral accumulated before ``t``. The parameter errors ``dq`` add up and are
    measured against ``|dL/dtheta|``. The figure is the sum of both shares over all intervals,
    which bounds the relative error of either part. NaN (a reverse solve that blew up) is always
    the worst."""
    q_norm = float(torch.linalg.vector_norm(q_end)) if q_end is not None and q_end.numel() else 0.0
    rel_a = rel_q = worst_part = 0.0
    worst_t = None
    for da, dq, a_norm, t in costs:
        if math.isnan(da) or math.isnan(dq):
            return math.nan, t
        part_a = da / a_norm if a_norm > 0 else 0.0
        part_q = dq / q_norm if q_norm > 0 else (math.inf if dq > 0 else 0.0)
        rel_a, rel_q = rel_a + part_a, rel_q + part_q
        if part_a + part_q > worst_part:
            worst_part, worst_t = part_a + part_q, t
    return rel_a + rel_q, worst_t
