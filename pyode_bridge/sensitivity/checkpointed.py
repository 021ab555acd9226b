"""``checkpointed``: ANODE's discretize-then-optimize gradient with step checkpoints."""
from __future__ import annotations

import bisect
import math

import torch

from .._state import add_note
from .._types import FlatState, FlatTrajectory, Gradients
from ..errors import SolverError
from ..solvers import SolverMethod, dense_step, rk_step
from ..solvers.boundaries import boundary_rhs, jumps_within
from ..solvers.loop import all_finite
from ._adjoint import (
    call_and_warn_unlisted,
    flat_param_grads,
    grad_keeping_graph,
    keep_every,
    record_forward,
    unflatten_param_grads,
)
from ._function import Saved
from .base import BackwardMemory, Problem, SolveSize, TwoPassSensitivity

__all__ = ["Checkpointed"]


def _carries(config) -> bool:
    """Whether the forward carries each step's last stage into the next (see
    ``ButcherTableau.carry_last``)."""
    return config.adaptive and not isinstance(config.tableau, SolverMethod) and config.tableau.carry_last


def _between(step_times, n_start: int, n_end: int) -> str:
    return f"between t={step_times[n_start]:.6g} and t={step_times[n_end]:.6g}"


class Checkpointed(TwoPassSensitivity):
    """ANODE (Gholami et al., 2019): store the state at every ``every``-th accepted step (no graph),
    and in the backward recompute each segment of ``every`` steps with autograd, from its stored
    state, and back-propagate through it.

    This is the exact gradient of the discrete forward map: it equals ``backprop``'s to round-off.
    Memory: O(Nt / every) states plus the activations of ``every`` steps. Backward cost: one
    recomputation of every step (``stages`` evaluations each) plus its autograd backward.
    """

    name = "checkpointed"
    solves_backward = False  # it replays the forward's steps under autograd

    def __init__(self, every: int = 1):
        if int(every) < 1:
            raise ValueError(f"Checkpointed(every={every}): every must be a positive integer")
        self.every = int(every)

    def predict_backward_bytes(self, size: SolveSize, *, nodes: int | str | None = None,
                               every: int | None = None, checkpointing: bool | None = None
                               ) -> BackwardMemory:
        """``ceil(N / k)`` step-start states besides the outputs; the backward rebuilds the graph
        of ``k`` steps (``k S g``) at a time."""
        k = int(every if every is not None else self.every)
        N, T = size.steps, size.n_outputs
        n_ck = math.ceil(N / k) if N else 0
        kept = size.outputs_bytes + n_ck * size.state_bytes
        seg_steps = min(k, max(N, 1))
        seg = seg_steps * size.stages * size.eval_saved_bytes
        return BackwardMemory(self.name, kept, kept + seg, f"({T} + {n_ck}) s + {seg_steps * size.stages} g")

    def forward_pass(self, prob: Problem, y0: FlatState) -> tuple[FlatTrajectory, Saved]:
        if isinstance(prob.config.tableau, SolverMethod):
            # Its steps are not Runge-Kutta steps of a stored state (multistep history, scipy).
            raise ValueError(f"sensitivity='checkpointed' recomputes Runge-Kutta steps and does not "
                             f"support method {prob.method!r}; use sensitivity='interpolated', "
                             "'interpolating' or 'backsolve' (or 'backprop', except for scipy_solver)")
        states, firsts = [], []
        keep = keep_every(self.every, states)
        on_step = keep
        if _carries(prob.config):
            # The first stage of a kept step is the derivative carried from the step before it:
            # kept too, so that the recomputed segment starts from exactly what the forward used.
            def on_step(step):
                kept = len(states)
                keep(step)
                if len(states) > kept:
                    firsts.append(step.k0)
        res = record_forward(prob, y0, on_step=on_step)
        return res.stacked(), Saved(states + firsts, res.step_times)

    def backward_pass(self, prob: Problem, saved: Saved, ys: FlatTrajectory, grad_ys: FlatTrajectory) -> Gradients:
        step_times, rhs, tab, t_eval, cfg = saved.meta, prob.rhs, prob.config.tableau, prob.t_eval, prob.config
        carry = _carries(cfg)
        states = saved.tensors[:len(saved.tensors) // 2] if carry else saved.tensors
        firsts = saved.tensors[len(states):]
        # The forward's evaluations just inside step boundaries (perturb, jump_t), repeated exactly.
        jumps = jumps_within(cfg.jump_t, t_eval[0], t_eval[-1])
        sign = 1.0 if t_eval[-1] >= t_eval[0] else -1.0
        keys = [sign * t for t in step_times]
        # Output j > 0 lies in step n when t_n < t_j <= t_{n+1}.
        outputs_in_step = {}
        for j in range(1, len(t_eval)):
            n = bisect.bisect_left(keys, sign * t_eval[j]) - 1
            outputs_in_step.setdefault(n, []).append(j)
        n_steps = len(step_times) - 1
        nfe0 = rhs.nfe
        context = "backward pass (checkpointed)"
        adj = torch.zeros_like(grad_ys[0])
        adj_f = None  # the adjoint of the derivative carried into the segment after this one
        param_acc = None
        keep_graph = True  # see grad_keeping_graph
        for s in reversed(range(len(states))):
            n_start, n_end = s * self.every, min((s + 1) * self.every, n_steps)
            with torch.enable_grad():
                y_start = states[s].detach().requires_grad_(True)
                y = y_start
                # As integrate: the first stage is carried unless the solve starts here or func
                # was evaluated just inside this boundary (perturb, jump_t).
                moved = cfg.perturb or step_times[n_start] in jumps
                f_start = None
                if carry and n_start > 0 and not moved:
                    f_start = firsts[s].detach().requires_grad_(True)
                f_carried = f_start
                outs, gouts = [], []
                for n in range(n_start, n_end):
                    t, t1 = step_times[n], step_times[n + 1]
                    dense_needed = any(t_eval[j] != t1 for j in outputs_in_step.get(n, ()))
                    end_moved = cfg.perturb or t1 in jumps
                    srhs = boundary_rhs(rhs, t, t1, cfg.time_dtype, cfg.perturb or t in jumps, end_moved)
                    check = s == len(states) - 1 and n == n_start  # the first evaluation with a graph
                    if f_carried is not None:
                        f0 = f_carried
                    elif check:
                        f0 = call_and_warn_unlisted(lambda: srhs(t, y), y, prob.params)
                    else:
                        f0 = srhs(t, y)

                    def step():
                        # Without an output inside the step, the FSAL stage feeds nothing here.
                        return rk_step(srhs, tab, t, y, f0, t1 - t, eval_last=dense_needed,
                                       config=prob.config, context=context)

                    if check and f_start is not None:
                        # The carried first stage made no evaluation: check the step's last one.
                        taken = []

                        def last_stage():
                            taken.append(step())
                            return taken[-1][1][-1]

                        call_and_warn_unlisted(last_stage, y, tuple(prob.params) + (f_start,))
                        y_new, ks, _, f_new = taken[0]
                    else:
                        y_new, ks, _, f_new = step()
                    f_carried = ks[-1] if carry and not end_moved else None
                    js = outputs_in_step.get(n, ())
                    inner = [j for j in js if t_eval[j] != t1]
                    if inner:
                        # The outputs inside the step as the forward computed them: one
                        # evaluation, or one batched evaluation for several (integrate's blocks).
                        if tab.fsal:
                            f_end = f_new
                        elif carry:
                            f_end = ks[-1]
                        else:
                            f_end = lambda tt=t1, yy=y_new, r=srhs: r(tt, yy)  # noqa: E731
                        step = dense_step(tab, t, t1 - t, y, y_new, ks, f_end, srhs, cfg.interp)
                        if len(inner) == 1:
                            outs.append(step.evaluate(t_eval[inner[0]]))
                            gouts.append(grad_ys[inner[0]])
                        else:
                            outs.append(step.evaluate_many([t_eval[j] for j in inner]))
                            gouts.append(grad_ys[inner[0]:inner[-1] + 1])
                    if len(inner) < len(js):
                        outs.append(y_new)
                        gouts.append(grad_ys[js[-1]])
                    y = y_new
                ends, gends, starts = [y], [adj], (y_start,)
                if adj_f is not None and f_carried is not None:
                    ends.append(f_carried)
                    gends.append(adj_f)
                if f_start is not None:
                    starts += (f_start,)
                try:
                    grads, keep_graph = grad_keeping_graph(ends + outs, starts + tuple(prob.params),
                                                           gends + gouts, keep_graph)
                except Exception as e:
                    add_note(e, f"raised while differentiating func {_between(step_times, n_start, n_end)} "
                                f"in the {context} with method '{tab.name}'")
                    raise
                # The retained graph of this chunk goes now, not when the next chunk rebinds these.
                y = y_new = f0 = f_new = ks = step = f_end = outs = ends = f_carried = None
            adj = grads[0] if grads[0] is not None else torch.zeros_like(adj)
            adj_f = None
            if f_start is not None:
                adj_f = grads[1] if grads[1] is not None else torch.zeros_like(f_start)
            pg = flat_param_grads(grads[len(starts):], prob.params)
            if not (all_finite(adj) and all_finite(pg)):
                raise SolverError(f"{context} with method '{tab.name}': the gradient became NaN/Inf "
                                  f"{_between(step_times, n_start, n_end)}; check func (its derivative) "
                                  "or lower the scale of the loss.")
            param_acc = pg if param_acc is None else param_acc.add_(pg)
        adj = adj + grad_ys[0]
        prob.stats.nfe_backward += rhs.nfe - nfe0
        prob.stats.steps_backward += n_steps
        return adj, unflatten_param_grads(param_acc, prob.params)
