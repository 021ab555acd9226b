"""``backsolve``: the reverse dynamic method (RDM) of Chen et al. (2018), with a stability guard."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch

from ..errors import SolverError
from ..solvers import integrate
from ._adjoint import VJP, adjoint_error_norm, gradient_scale, interval_config, record_forward, unflatten_param_grads
from ._function import Saved
from .base import Problem, Sensitivity

__all__ = ["Backsolve"]

_POLICIES = ("warn", "raise", "ignore")


class Backsolve(Sensitivity):
    """Solve ``[z, a, dL/dtheta]`` backwards from the final state: O(L) memory, no stored
    trajectory, but the reverse solve of ``z`` can be unstable (ANODE, Gholami et al. 2019).

    Args:
        rtol, atol: tolerances of the backward solve (default: ``adjoint_rtol``/``adjoint_atol``,
            else the forward's).
        on_instability: what to do when the reverse-solved ``z`` misses the forward's ``z`` at an
            output time by more than the tolerances allow (RMS of the mismatch scaled by
            ``atol + rtol |z|``, above ``guard_factor``): ``"warn"`` (default), ``"raise"``
            (:class:`~pyode_bridge.SolverError`) or ``"ignore"``. The measure is in
            ``stats.backsolve_error``.
        guard_factor: how many times the tolerance the mismatch may reach before the guard fires.
    """

    name = "backsolve"

    def __init__(self, rtol=None, atol=None, on_instability="warn", guard_factor=100.0):
        if on_instability not in _POLICIES:
            raise ValueError(f"on_instability must be one of {_POLICIES}, got {on_instability!r}")
        self.rtol, self.atol = rtol, atol
        self.on_instability, self.guard_factor = on_instability, float(guard_factor)

    def forward_pass(self, prob: Problem, y0):
        res = record_forward(prob, y0)
        return res.stacked(), Saved()

    def backward_pass(self, prob: Problem, saved, ys, grad_ys):
        t_eval, N = prob.t_eval, ys.shape[1]
        cfg = prob.adjoint_config.with_tolerances(self.rtol, self.atol)
        # The augmented state is [z, a]: each is controlled on its own (with the tuple's parts).
        cfg = replace(cfg, norm_splits=(cfg.norm_splits or (N,)) * 2,
                      norm=adjoint_error_norm(prob, cfg, with_z=True))
        vjp = VJP(prob)
        nfe0 = prob.rhs.nfe
        context = "backward pass (backsolve)"
        prob.rhs.context = context

        def rhs(t, za):
            # The product with -a (a view of the state): negating the product in place would negate
            # the state itself where the product is the incoming vector (func = identity).
            f, gz, gp = vjp(t, za[:N], torch.neg(za[N:]))
            return torch.cat([f, gz]), gp

        a = grad_ys[-1].clone()
        q = a.new_zeros(vjp.n_params)
        # z keeps the state's atol; a and the parameter integral measure theirs in units of the
        # incoming gradient (see gradient_scale).
        scale, q_scale = gradient_scale(grad_ys), gradient_scale(grad_ys, 2)
        za_scale = torch.cat([a.new_ones(N), a.new_full((N,), scale)]) if scale != 1.0 else 1.0
        misses = []  # (mismatch, |a|, t) at each output time the reverse solve reaches
        carried = None  # the step size is carried from one output interval to the next
        for k in range(len(t_eval) - 1, 0, -1):
            t_hi, t_lo = t_eval[k], t_eval[k - 1]
            # z restarts from the forward's stored output at every output time (as torchdiffeq).
            za = torch.cat([ys[k], a])
            icfg = interval_config(cfg, t_hi, t_lo)
            if carried is not None and icfg.first_step is None:
                icfg = replace(icfg, first_step=carried)
            try:
                res = integrate(rhs, za, [t_hi, t_lo], icfg, q0=q,
                                q_splits=vjp.q_splits, atol_scale=za_scale, q_atol_scale=q_scale,
                                context=context)
            except SolverError as e:
                raise SolverError(f"{e} The reverse solve of z is unstable here (ANODE's failure "
                                  "mode); use sensitivity='checkpointed' or 'interpolated', which "
                                  "do not solve z backwards.") from e
            za, q = res.ys[-1], res.q_end
            carried = res.next_step
            prob.stats.steps_backward += res.steps
            prob.stats.steps_backward_rejected += res.rejected
            misses.append((_mismatch(za[:N], ys[k - 1], cfg.rtol, cfg.atol),
                           float(torch.linalg.vector_norm(za[N:])), t_lo))
            a = za[N:] + grad_ys[k - 1]
        worst, worst_t = _weighted_worst(misses, float(torch.linalg.vector_norm(grad_ys[-1])))
        prob.stats.nfe_backward += prob.rhs.nfe - nfe0
        prob.stats.backsolve_error = worst
        prob.rhs.context = "forward solve"
        self._guard(worst, worst_t, cfg, t_eval, context, prob.adjoint_config.tableau.name)
        return a, unflatten_param_grads(q, prob.params)

    def _guard(self, worst, worst_t, cfg, t_eval, context, method):
        if self.on_instability == "ignore" or not (worst > self.guard_factor or math.isnan(worst)):
            return
        msg = (f"{context} with method '{method}': the reverse-solved state misses the forward "
               f"state at t={worst_t:.6g} by {worst:.3g} times the tolerance (rtol={cfg.rtol:g}, "
               f"atol={cfg.atol:g}; solve on [{t_eval[0]:g}, {t_eval[-1]:g}]); the backward solve "
               "of z is unstable and the gradient is unreliable. Use sensitivity='checkpointed' "
               "(exact) or 'interpolated'.")
        if self.on_instability == "raise":
            raise SolverError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _weighted_worst(misses, a_end):
    """The largest mismatch weighted by the adjoint's size where it happened, relative to its
    largest size along the sweep, and its time.

    An error in ``z`` enters the gradient multiplied by ``a(t)``: where the adjoint has decayed
    (a contracting system solved backwards from a late loss), even a large relative error in the
    reverse-solved ``z`` costs nothing (measured: a forced linear problem with ``y(0) = 0`` reached
    a raw mismatch of 1e43 with gradients accurate to 1e-5), so the raw mismatch alone cries wolf.
    A NaN mismatch always counts as the worst."""
    a_max = max([a_end] + [m[1] for m in misses])
    worst, worst_t = 0.0, None
    for miss, a_norm, t in misses:
        w = miss * (a_norm / a_max if a_max > 0 else 1.0)
        if math.isnan(miss):
            return math.nan, t
        if w > worst:
            worst, worst_t = w, t
    return worst, worst_t


def _mismatch(z_back, z_fwd, rtol, atol) -> float:
    scale = z_fwd.abs().mul(rtol).add_(atol)
    return (torch.linalg.vector_norm((z_back - z_fwd) / scale) / math.sqrt(z_fwd.numel())).item()
