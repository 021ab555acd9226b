"""What every stepping loop shares (the Runge-Kutta loop, Adams, scipy): the errors they raise,
the NaN/Inf checks, and the collection of the states at the output times (:class:`Outputs`)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from ..errors import SolverError
from .dense import DenseStep

if TYPE_CHECKING:
    from .method import SolverMethod
    from .tableau import ButcherTableau

__all__ = ["fail", "RefuseBackward", "all_finite", "add_quadrature", "collect_outputs", "FiniteWatch", "Outputs",
           "FINITE_CHECK_EVERY", "FINITE_CHECK_HOLD"]


def fail(msg: str, context: str, method: ButcherTableau | SolverMethod | None) -> SolverError:
    """The :class:`SolverError` of a solve: ``msg`` prefixed by ``context`` and the method's name."""
    where = context if method is None else f"{context} with method '{method.name}'"
    return SolverError(f"{where}: {msg}")


class RefuseBackward(torch.autograd.Function):
    """``apply(error, message, n, *values, *anchors)``: the ``n`` tensors ``values`` unchanged
    (copies), attached to the graph of all the inputs through a node whose backward raises
    ``error(message)``: a gradient that cannot be given fails clearly instead of silently
    coming out as none or zero."""

    @staticmethod
    def forward(ctx: Any, error: type[Exception], message: str, n: int, *args: Tensor) -> tuple[Tensor, ...]:
        ctx.error, ctx.message = error, message
        return tuple(a.clone() for a in args[:n])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> None:
        raise ctx.error(ctx.message)


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf: one reduction and one host sync (the sum of the entries is
    non-finite whenever one of them is; only when it overflows is every entry tested)."""
    if x.requires_grad:
        x = x.detach()
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


def add_quadrature(q: Tensor | None, q0: Tensor | None, dq: Tensor) -> Tensor:
    """The quadrature ``q + dq`` ``(Q,)`` after an accepted step: in place once it is the solve's
    own tensor and nothing differentiates it, out of place while it is the caller's ``q0``."""
    assert q is not None  # a step has a dq only with a quadrature
    return q.add_(dq) if (q is not q0 and not torch.is_grad_enabled()) else q + dq


def collect_outputs(blocks: list[Tensor], t_eval: Sequence[float], next_out: int, t0: float, t1: float,
                    direction: float, y_new: Tensor, make_step: Callable[[], DenseStep], *,
                    check_finite: bool, context: str,
                    method: ButcherTableau | SolverMethod) -> tuple[int, DenseStep | None]:
    """Append to ``blocks`` the states at the output times ``t_eval[next_out:]`` that an accepted
    step from ``t0`` to ``t1`` reaches; shared by every stepping loop.

    Every output time inside the step comes from one evaluation of its continuous extension
    (``make_step()``, built only if needed): a ``(K, N)`` block, whose rows are views, and stacking
    them back costs one autograd node per block, so many output times cost about what one does.
    An output at ``t1`` itself is ``y_new`` ``(N,)``. Returns ``(next_out, step or None)``.
    """
    n_eval, j = len(t_eval), next_out
    while j < n_eval and direction * (t_eval[j] - t1) <= 0:
        j += 1
    step = None
    if j > next_out:
        inner = t_eval[next_out:j - 1] if t_eval[j - 1] == t1 else t_eval[next_out:j]
        if inner:
            step = make_step()
            block = step.evaluate(inner[0]).unsqueeze(0) if len(inner) == 1 else step.evaluate_many(inner)
            # The continuous extension can overflow inside a step whose end state is finite.
            if check_finite and not all_finite(block):
                bad = int((~torch.isfinite(block)).any(1).nonzero()[0, 0])
                raise fail(f"the dense output at t={inner[bad]:.6g} became NaN/Inf inside the step "
                           f"from t={t0:.6g} to t={t1:.6g}; use a smaller step_size or an adaptive "
                           "method, or check func.", context, method)
            blocks.append(block)
        if len(inner) < j - next_out:
            blocks.append(y_new)
    return j, step


# NaN/Inf checks on the CPU: every FINITE_CHECK_EVERY steps, of the newest state and running
# quadrature only. Both stay non-finite once they are (y_new = y + h * sum b_i k_i, q = q + dq), so
# a finite newest value clears every step since the last check; a non-finite one is traced back to
# its first step through the held references. Holding them costs up to that many states, so states
# above FINITE_CHECK_HOLD entries (whose fields dwarf a check) are checked every step.
FINITE_CHECK_EVERY = 8
FINITE_CHECK_HOLD = 1 << 16


def _finite(x: Tensor | tuple[Tensor, ...]) -> bool:
    return all(all_finite(v) for v in x) if isinstance(x, tuple) else all_finite(x)


class FiniteWatch:
    """Deferred NaN/Inf checks of a quantity that stays non-finite once it is (see above).

    ``add(t0, t1, x)`` records a step and ``x``, the tensor (or tensors) it contributed (the new
    state, or the quadrature increment); ``check(latest)`` tests only the newest accumulated value
    (a tensor or a tuple of them) and, if it is not finite, raises ``fail(t0, t1)`` for the first
    recorded step whose ``x`` is not. Tuples spare joining tensors only a failure looks at."""

    def __init__(self, every: int, fail: Callable[[float, float], SolverError]) -> None:
        self.every, self.fail = every, fail
        self.pending: list[tuple[float, float, Tensor | tuple[Tensor, ...]]] = []

    def add(self, t0: float, t1: float, x: Tensor | tuple[Tensor, ...]) -> None:
        self.pending.append((t0, t1, x))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def check(self, latest: Tensor | tuple[Tensor, ...]) -> None:
        if not _finite(latest):
            for t0, t1, x in self.pending:
                if not _finite(x):
                    raise self.fail(t0, t1)
            # Not finite before the held steps (a non-finite start): name the whole span.
            raise self.fail(self.pending[0][0], self.pending[-1][1])
        self.pending.clear()


class Outputs:
    """What a solve keeps of its accepted steps: the states at ``t_eval`` (dense output), the
    ``on_step`` calls, and the NaN/Inf watches of the state and the quadrature.

    ``emit(step, last)`` takes one accepted step (anything with ``t0``, ``t1``, ``y_new`` ``(N,)``,
    ``dq`` ``(Q,)`` or None, ``q1``: the quadrature after it, and ``dense()``, its
    :class:`DenseStep`, built only where an output time or ``on_step`` needs it) and returns
    whether ``on_step`` asked to end the solve; ``finish(y, q)`` runs the checks still due.
    ``blocks``: the outputs, ``(N,)`` states and ``(K, N)`` blocks, in time order (see
    :class:`~pyode_bridge.solvers.loop.IntegrateResult`).

    On the CPU (``check_every_step``) a fixed-step solve's states and every quadrature are watched
    in groups of steps (an adaptive step's error test already rejects a non-finite state); off the
    CPU there is one host sync for the whole solve, in ``finish`` (an exact replay, which repeats a
    solve checked on the same numbers, runs none: :class:`~pyode_bridge.solvers.loop.Replay`).
    A per-sample solve emits steps
    whose ``t0``/``t1`` are ``(B,)`` tensors; it needs its own output placement, not a new loop.
    """

    def __init__(self, y0: Tensor, t_eval: Sequence[float], on_step: Callable[[DenseStep], Any] | None,
                 *, adaptive: bool, quad: bool, check_every_step: bool, context: str,
                 method: ButcherTableau | SolverMethod) -> None:
        self.blocks: list[Tensor] = [y0]
        self.t_eval, self.next_out, self.on_step = t_eval, 1, on_step
        self.t_start, self.t_end = float(t_eval[0]), float(t_eval[-1])
        self.direction = 1.0 if self.t_end >= self.t_start else -1.0
        self.check_every_step = check_every_step
        self.check_end = not check_every_step
        self.context, self.method = context, method
        self.check_last = self.check_end and not adaptive  # a fixed-step solve's last state
        self.y_watch = self.q_watch = None
        if self.check_every_step:
            every = FINITE_CHECK_EVERY if y0.numel() <= FINITE_CHECK_HOLD else 1
            if not adaptive:
                self.y_watch = FiniteWatch(every, lambda t0, t1: fail(
                    f"the state became NaN/Inf between t={t0:.6g} and t={t1:.6g}; use a smaller "
                    "step_size or an adaptive method, or check func.", context, method))
            if quad:
                self.q_watch = FiniteWatch(every, lambda t0, t1: fail(
                    f"the integrated parameter gradient became NaN/Inf between t={t0:.6g} and "
                    f"t={t1:.6g}; check func (its vector-Jacobian product) or lower the scale of the "
                    "loss.", context, method))

    def emit(self, step: Any, last: bool) -> bool:
        """Record the accepted ``step`` (``last``: it ends the solve); True if ``on_step`` ends it."""
        t0, t1, y_new = step.t0, step.t1, step.y_new
        y_watch = self.y_watch
        if y_watch is not None:
            y_watch.add(t0, t1, y_new)
            if last or y_watch.due():
                y_watch.check(y_new)
        elif self.check_last and last and not all_finite(y_new):
            raise fail(f"the state became NaN/Inf between t={t0:.6g} and t={t1:.6g}; use a smaller "
                       "step_size or an adaptive method, or check func.", self.context, self.method)
        if self.direction * (self.t_eval[self.next_out] - t1) <= 0:  # an output time in this step
            try:
                self.next_out, _ = collect_outputs(
                    self.blocks, self.t_eval, self.next_out, t0, t1, self.direction, y_new, step.dense,
                    check_finite=self.check_every_step, context=self.context, method=self.method)
            except SolverError:
                if y_watch is not None:  # a state that is not finite names the step that made it
                    y_watch.check(y_new)
                raise
        stop = self.on_step is not None and self.on_step(step.dense()) is True
        q_watch = self.q_watch
        if q_watch is not None:
            q_watch.add(t0, t1, step.dq)
            if last or q_watch.due():
                q_watch.check(step.q1)
        return stop

    def finish(self, y: Tensor, q: Tensor | None) -> None:
        """The checks still due at the end of the solve (``y`` ``(N,)``, ``q`` ``(Q,)``: its last
        state and quadrature); off the CPU, the solve's one NaN/Inf check."""
        if self.y_watch is not None and self.y_watch.pending:  # a solve ended early by on_step
            self.y_watch.check(y)
        if self.q_watch is not None and self.q_watch.pending:
            assert q is not None  # watched only with a quadrature
            self.q_watch.check(q)
        if self.check_end:
            tail = self.blocks[1:] + ([] if q is None else [q])
            if not bool(torch.stack([torch.isfinite(v).all() for v in tail]).all()):
                raise fail(f"the solution became NaN/Inf between t={self.t_start:.6g} and "
                           f"t={self.t_end:.6g}; use a smaller step_size or an adaptive method, or "
                           "check func.", self.context, self.method)
