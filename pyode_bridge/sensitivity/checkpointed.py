"""``checkpointed``: ANODE's discretize-then-optimize gradient with step checkpoints."""
from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor

from .._state import add_note
from .._types import FlatState, FlatTrajectory, Gradients
from ..errors import SolverError
from ..solvers import SolverMethod
from ..solvers.boundaries import jumps_within
from ..solvers.loop import Replay
from ..solvers.util import FINITE_CHECK_EVERY, FINITE_CHECK_HOLD, FiniteWatch
from ._adjoint import ParamGradSum, call_and_warn_unlisted, grad_keeping_graph, keep_every, record_forward
from ._function import Saved
from .base import BackwardMemory, Problem, SolveSize, TwoPassSensitivity

__all__ = ["Checkpointed"]


def _carries(config) -> bool:
    """Whether the forward carries each step's last stage into the next (see
    ``ButcherTableau.carry_last``)."""
    return config.adaptive and not isinstance(config.method, SolverMethod) and config.method.carry_last


def _checking_first_call(rhs, state: Tensor, known: tuple):
    """``rhs`` whose first call goes through :func:`call_and_warn_unlisted`: it warns about
    tensors func captures that are neither ``state`` nor in ``known``."""
    pending = [True]

    def f(t: float, y: Tensor):
        if pending:
            pending.clear()
            return call_and_warn_unlisted(lambda: rhs(t, y), state, known)
        return rhs(t, y)

    return f


class Checkpointed(TwoPassSensitivity):
    """ANODE (Gholami et al., 2019): store the state at every ``every``-th accepted step (no graph),
    and in the backward recompute each segment of ``every`` steps with autograd, from its stored
    state, and back-propagate through it.

    This is the exact gradient of the discrete forward map: it equals ``backprop``'s to round-off.
    Memory: O(Nt / every) states plus the activations of ``every`` steps. Backward cost: one
    recomputation of every step (``stages`` evaluations each) plus its autograd backward.
    """

    name = "checkpointed"
    per_sample = "replay"
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
        if isinstance(prob.config.method, SolverMethod):
            # Its steps are not Runge-Kutta steps of a stored state (multistep history, scipy).
            raise ValueError(f"sensitivity='checkpointed' recomputes Runge-Kutta steps and does not "
                             f"support method {prob.method!r}; use sensitivity='interpolated', "
                             "'interpolating' or 'backsolve' (or 'backprop', except for scipy_solver)")
        states: list[torch.Tensor] = []
        firsts: list[torch.Tensor] = []
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

    def backward_pass(self, prob: Problem, saved: Saved, ys: FlatTrajectory, grad_ys: FlatTrajectory
                      ) -> Gradients:
        """Replay each segment (:class:`~pyode_bridge.solvers.loop.Replay`) under autograd, the last first, and pull
        the adjoint of its end state (and of the derivative it carries into the next segment)
        back to its start. ``grad_ys`` ``(T, N)``; returns ``(dL/dy0 (N,), [dL/dp or None])``."""
        step_times, rhs, t_eval, cfg = saved.meta, prob.rhs, prob.t_eval, prob.config
        n_ck = len(saved.tensors) // 2 if _carries(cfg) else len(saved.tensors)
        states, firsts = saved.tensors[:n_ck], saved.tensors[n_ck:]
        # The forward carried a segment's first stage in unless the segment starts the solve or
        # func was evaluated just inside its start (perturb, jump_t).
        jumps = jumps_within(cfg.time.jump_t, t_eval[0], t_eval[-1])
        sign = 1.0 if t_eval[-1] >= t_eval[0] else -1.0
        keys = [sign * t for t in t_eval]
        params = tuple(prob.params)
        n_steps = len(step_times) - 1
        nfe0 = rhs.nfe
        context = "backward pass (checkpointed)"
        adj = torch.zeros_like(grad_ys[0])
        # NaN/Inf in the gradient persist backwards (adj passes on through y_new = y + ...; the
        # parameter gradient is a running sum): checked every few segments, as the forward's states.
        watch = FiniteWatch(FINITE_CHECK_EVERY if adj.numel() <= FINITE_CHECK_HOLD else 1, lambda t0, t1: SolverError(
            f"{context} with method '{cfg.method.name}': the gradient became NaN/Inf between t={t0:.6g} and "
            f"t={t1:.6g}; check func (its derivative) or lower the scale of the loss."))
        adj_f = None  # the adjoint of the derivative carried into the segment after this one
        param_sum = ParamGradSum(params)
        keep_graph = True  # see grad_keeping_graph
        # One replay (configuration, stepper) for all segments; each segment passes its own grid.
        replay = Replay(rhs, cfg.replay(step_times, exact=True), step_times[0], step_times[-1], context)
        with torch.enable_grad():  # the replays; nothing else here builds a graph
            for s in reversed(range(n_ck)):
                grid = step_times[s * self.every:(s + 1) * self.every + 1]
                # The outputs in this segment, grid[0] < t_j <= grid[-1], as integrate collects them.
                lo, hi = bisect.bisect_right(keys, sign * grid[0]), bisect.bisect_right(keys, sign * grid[-1])
                times = [grid[0]] + list(t_eval[lo:hi])
                if hi == lo or times[-1] != grid[-1]:
                    times.append(grid[-1])
                y_start = states[s].detach().requires_grad_(True)
                f_start = None
                if firsts and s > 0 and not (cfg.time.perturb or grid[0] in jumps):
                    f_start = firsts[s].detach().requires_grad_(True)
                starts = (y_start,) if f_start is None else (y_start, f_start)
                # The first evaluation with a graph checks the tensors func captures.
                res = replay.segment(rhs if s < n_ck - 1 else _checking_first_call(rhs, y_start, params + starts[1:]),
                                     y_start, times, grid, f_start)
                assert res.blocks is not None  # a replay collects its outputs as blocks
                ends, gends = [res.blocks[-1]], [adj]
                if adj_f is not None:
                    ends.append(res.carried)
                    gends.append(adj_f)
                outs, gouts, j = [], [], lo
                for b in res.blocks[1:]:  # (K, N) blocks inside steps, (N,) states at step ends
                    if j == hi:  # the segment's end is no output
                        break
                    outs.append(b)
                    gouts.append(grad_ys[j:j + b.shape[0]] if b.dim() == 2 else grad_ys[j])
                    j += b.shape[0] if b.dim() == 2 else 1
                try:
                    grads, keep_graph = grad_keeping_graph(ends + outs, starts + params, gends + gouts, keep_graph)
                except Exception as e:
                    add_note(e, f"raised while differentiating func between t={grid[0]:.6g} and t={grid[-1]:.6g} "
                                f"in the {context} with method '{cfg.method.name}'")
                    raise
                # The retained graph of this segment goes now, not when the next one rebinds these.
                del res, ends, outs
                adj = grads[0] if grads[0] is not None else torch.zeros_like(adj)
                adj_f = None
                if f_start is not None:
                    adj_f = grads[1] if grads[1] is not None else torch.zeros_like(f_start)
                pg = param_sum.add(grads[len(starts):])
                watch.add(grid[0], grid[-1], (adj, *pg))
                if watch.due() or s == 0:
                    assert param_sum.sums is not None  # set by the add above
                    watch.check((adj, *param_sum.sums))
        adj = adj + grad_ys[0]
        prob.stats.nfe_backward += rhs.nfe - nfe0
        prob.stats.steps_backward += n_steps
        return adj, param_sum.result()
