"""Step-size control: error norm, PI controller, the initial step heuristic, and the step
controls of the stepping loop (:class:`AdaptiveControl`, :class:`GridControl`)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .util import fail

__all__ = ["PIController", "error_ratio", "quadrature_error_ratio", "initial_step", "StepControl",
           "AdaptiveControl", "GridControl", "STRETCH"]


def error_ratio(err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol: float,
                atol: float | torch.Tensor, splits: Sequence[int] | None = None) -> torch.Tensor:
    """RMS of ``err / (atol + rtol * max(|y0|, |y1|))`` as a 0-d tensor (no host sync).

    ``atol`` is a float or a tensor broadcastable to ``err`` (per-component tolerances).

    With ``splits`` (the sizes of a tuple state's parts) it is the largest of the parts' RMS
    values, so a small part (a CNF's ``logp`` beside ``z``) is controlled on its own instead of
    being averaged away (torchdiffeq's mixed norm does the same).
    """
    with torch.no_grad():
        if not splits or len(splits) == 1:
            # The RMS's 1/sqrt(N) folded into the scale: one operation fewer per step.
            root_n = math.sqrt(err.numel())
            scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol * root_n)
            if isinstance(atol, float):
                scale.add_(atol * root_n)
            else:  # per-component tolerances (N,)
                scale.add_(atol, alpha=root_n)
            return torch.linalg.vector_norm(err / scale)
        scaled = err / torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        return torch.stack([torch.linalg.vector_norm(p) / math.sqrt(p.numel())
                            for p in scaled.split(list(splits))]).max()


def quadrature_error_ratio(err: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor, rtol: float,
                           atol: float, splits: Sequence[int] | None = None) -> torch.Tensor:
    """Error ratio of an integrated quadrature (an adjoint's parameter gradient), 0-d tensor.

    Each part (one parameter tensor) is measured relative to its own largest entry:
    RMS of ``err`` over ``atol + rtol * max(|q0|, |q1|)`` taken over the part. An entry-wise scale
    would demand absolute accuracy ``atol`` of the entries that happen to be near zero, which for
    a conv layer's weight gradient cost 44 backward evaluations instead of 20 at no gain in the
    gradient's accuracy relative to its size (the aim)."""
    with torch.no_grad():
        parts = list(splits) if splits else [err.numel()]
        ratios = []
        for e, a, b in zip(err.split(parts), q0.split(parts), q1.split(parts)):
            scale = torch.maximum(a.abs().max(), b.abs().max()) * rtol + atol
            ratios.append(torch.linalg.vector_norm(e) / math.sqrt(e.numel()) / scale)
        return ratios[0] if len(ratios) == 1 else torch.stack(ratios).max()


class PIController:
    """Step-size controller: integral by default, proportional-integral with ``beta > 0``
    (Hairer, Norsett & Wanner II.4; Gustafsson).

    ``h_new = h * clamp(s * r**(-alpha) * r_prev**beta, dfactor, ifactor)`` where ``r`` is the
    error ratio of the current step, ``r_prev`` that of the last accepted one, ``k`` the error
    order, ``alpha = 1/k - 0.75 beta`` and ``s = safety**(k * (alpha - beta))``, which puts the
    fixed point ``r = r_prev`` at ``safety**k`` (0.59 for dopri5) whatever ``beta``.

    ``beta`` defaults to 0: ``safety * r**(-1/k)``, torchdiffeq's and torchode's controller. A PI
    term (Hairer's ``beta = 0.2/k``) lowers the integral gain to ``alpha - beta = 0.65/k``: where
    the step must keep growing (a decaying solution, DETEST A2: r held near 0.06) it settles at a
    ratio several times below the target, and after a first step far below tolerance
    (``r_prev`` ~ 1e-4) it shrinks the next one although it was accepted at r = 0.25. On DETEST at
    equal tolerance tsit5 took up to 1.19x torchode's evaluations with it, at most 1.10x without
    (benchmarks/README.md, "Work-precision").

    A rejected step is never increased, and neither is the step that follows a rejection once it
    is accepted (Hairer's ``facmax = 1`` after a rejection, as scipy does): growing right after a
    failure tends to fail again. An accepted step of a 2nd-order pair (``k = 2``: adaptive_heun,
    fehlberg2) is never shrunk either, as torchdiffeq never shrinks one: shrinking it on
    Lotka-Volterra (DETEST B1) gave adaptive_heun the same evaluations as torchdiffeq at 4-6x its
    error; for ``k >= 3`` it costs evaluations (dopri5 +4%, tsit5 +5% on DETEST).
    """

    def __init__(self, error_order: int, *, safety: float = 0.9, ifactor: float = 10.0,
                 dfactor: float = 0.2, beta: float | None = None, max_step: float = math.inf) -> None:
        self.beta = 0.0 if beta is None else float(beta)
        self.alpha = 1.0 / error_order - 0.75 * self.beta
        self.safety, self.ifactor, self.dfactor, self.max_step = safety, ifactor, dfactor, max_step
        self.error_order = error_order
        self.pi_safety = safety ** (error_order * (self.alpha - self.beta))
        self.prev_ratio: float | None = None
        self.after_rejection = False

    def propose(self, h: float, ratio: float, accepted: bool) -> float:
        """Next step size (same sign as ``h``) after a step with error ratio ``ratio``."""
        if ratio == 0.0:
            factor = self.ifactor
        elif self.prev_ratio is None:
            # No error history yet: plain integral control, so short solves (a neural ODE often
            # takes 2-3 steps) are not slowed by the PI term's damping of the first growth.
            factor = self.safety * ratio ** (-1.0 / self.error_order)
        else:
            factor = self.pi_safety * ratio ** (-self.alpha)
            if accepted:
                factor *= self.prev_ratio ** self.beta
        if accepted and self.error_order <= 2:
            factor = max(factor, 1.0)
        grow_cap = self.ifactor if (accepted and not self.after_rejection) else 1.0
        factor = min(grow_cap, max(self.dfactor, factor))
        self.after_rejection = not accepted
        if accepted:
            self.prev_ratio = max(ratio, 1e-4)
        h_new = h * factor
        if abs(h_new) > self.max_step:
            h_new = math.copysign(self.max_step, h)
        return h_new


    def propose_rows(self, h: np.ndarray, ratio: np.ndarray, accepted: np.ndarray, prev_beta: np.ndarray,
                     has_prev: np.ndarray, after_rejection: np.ndarray) -> np.ndarray:
        """:meth:`propose` for every row of a per-sample solve at once (float64/bool NumPy arrays
        ``(B,)``; the caller keeps the state): ``prev_beta`` is each row's last accepted ratio
        ``** beta``, ``has_prev`` whether it has one, ``after_rejection`` whether its last step was
        rejected. A NaN/Inf ratio (factor NaN or 0) cuts the step by ``dfactor``. Returns ``h_new``.
        Call under ``np.errstate(all="ignore")`` (``0 ** -alpha`` and NaN ratios are expected)."""
        gain = np.where(has_prev, self.pi_safety * np.where(accepted, prev_beta, 1.0), self.safety)
        factor = gain * ratio ** np.where(has_prev, -self.alpha, -1.0 / self.error_order)
        if self.error_order <= 2:
            factor = np.where(accepted, np.maximum(factor, 1.0), factor)
        cap = np.where(accepted & ~after_rejection, self.ifactor, 1.0)
        # fmax takes dfactor over a NaN factor (np.nan_to_num's result, at a seventh of its cost).
        h_new = h * np.minimum(cap, np.fmax(factor, self.dfactor))
        return np.maximum(np.minimum(h_new, self.max_step), -self.max_step)


def initial_step(rhs: Callable[[float, torch.Tensor], torch.Tensor], t0: float, y0: torch.Tensor,
                 f0: torch.Tensor, order: int, rtol: float, atol: float | torch.Tensor, direction: float,
                 span: float = math.inf,
                 norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Hairer-Norsett-Wanner initial step heuristic (Solving ODEs I, II.4). Costs one evaluation.

    The probe and the result never exceed ``span`` (the length of the integration interval): a
    right-hand side may only be defined on it (an adjoint reading an interpolant of z(t)).
    ``norm``: the solve's error norm of a scaled state (default RMS), as torchdiffeq uses it here.
    Returns a Python float with the sign of ``direction``.
    """
    n = math.sqrt(y0.numel())
    if norm is None:
        norm = lambda v: torch.linalg.vector_norm(v) / n  # noqa: E731
    with torch.no_grad():
        scale = y0.abs().mul(rtol).add_(atol)
        d0 = abs(float(norm(y0 / scale)))
        d1 = abs(float(norm(f0 / scale)))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5 or not math.isfinite(d0 / d1)) else 0.01 * d0 / d1
        h0 = min(h0, span)
        y1 = torch.add(y0, f0, alpha=direction * h0)
        f1 = rhs(t0 + direction * h0, y1)
        d2 = abs(float(norm((f1 - f0) / scale))) / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        h = min(100 * h0, h1, span)
    return direction * h


class StepControl:
    """Where the next step goes and whether it stands: the one decision-maker of the stepping loop.

    The loop (:func:`~pyode_bridge.solvers.integrate`) only asks::

        while not control.done:
            t0, t1 = control.propose()        # the step's ends, landed on stops and the end
            step = stepper.attempt(t0, t1)
            if not control.judge(ratio(step), step):   # counts it; False: rejected, retry
                continue
            ...                                # advance and emit the accepted step

    ``propose`` counts the attempt against ``max_num_steps``; ``judge`` counts accepted and
    rejected steps, records ``step_times`` (the accepted boundaries) and raises on underflow.
    Times are Python floats; the loop never compares them itself.

    Per-sample control (every batch row its own ``t``, ``h``, error ratio and acceptance) is a
    subclass with the same three members: ``propose`` returns ``(B,)`` tensors ``t0``/``t1``
    (finished rows with ``t1 == t0``), the ratio function returns a ``(B,)`` ratio, and ``judge``
    keeps the rejected rows of ``step`` at their start (``y_new[b] = y0[b]``, and likewise the
    stages the next step carries), returns True while any row moved, and sets ``done`` once
    every row has reached its end. The loop body stays as it is.
    """

    def __init__(self, t_start: float, t_end: float, max_num_steps: int, context: str,
                 method: Any) -> None:
        self.t, self.t_end = t_start, t_end
        self.direction = 1.0 if t_end >= t_start else -1.0
        self.max_num_steps, self.context, self.method = max_num_steps, context, method
        self.steps = self.rejected = self.attempts = 0
        self.step_times = [t_start]
        self.last = self.done = False

    @property
    def next_step(self) -> float | None:
        """After the solve, the step size a following interval can start from (None: fixed steps)."""
        return None

    def _count_attempt(self) -> None:
        self.attempts += 1
        if self.attempts > self.max_num_steps:
            raise fail(f"reached max_num_steps={self.max_num_steps} at t={self.t:.6g} before "
                       f"t={self.t_end:.6g} ({self.steps} accepted, {self.rejected} rejected steps). "
                       "The problem may be stiff or the tolerances too tight; raise "
                       "options={'max_num_steps': ...} or loosen rtol/atol.", self.context, self.method)

    def _accept(self, t1: float) -> None:
        self.steps += 1
        self.step_times.append(t1)
        self.t, self.done = t1, self.last

    def propose(self) -> tuple[float, float]:
        """The next step's ends ``(t0, t1)``."""
        raise NotImplementedError

    def judge(self, ratio: float | None, step: Any) -> bool:
        """Whether the attempted ``step`` (from ``propose``'s ends; its error ratio ``ratio``)
        stands; an accepted step moves ``t`` to its end."""
        raise NotImplementedError


class GridControl(StepControl):
    """Fixed steps on exactly the boundaries ``grid`` (every step accepted, no error ratio)."""

    def __init__(self, grid: Sequence[float], max_num_steps: int, context: str, method: Any) -> None:
        super().__init__(grid[0], grid[-1], max_num_steps, context, method)
        self.grid, self.i = grid, 1

    def propose(self) -> tuple[float, float]:
        self._count_attempt()
        i = self.i
        self.last = i == len(self.grid) - 1
        return self.t, self.grid[i]

    def judge(self, ratio: float | None, step: Any) -> bool:
        self.i += 1
        self._accept(step.t1)
        return True


# An adaptive step may grow by this factor to land on the end or a stop.
STRETCH = 1.01


class AdaptiveControl(StepControl):
    """Error-controlled steps: :class:`PIController` is the step-size law; this class lands the
    steps on ``stops`` (``step_t``/``jump_t`` inside the interval) and the end, and applies
    ``min_step`` (a step of that size is accepted whatever its finite error), ``max_step``, the
    resolution of ``t`` (underflow) and the step callbacks (``callbacks.accept``/``reject``).

    ``h``: the first step's size (its sign is taken from the direction); ``next_step``: after the
    solve, the step size a following interval can start from."""

    def __init__(self, pi: PIController, h: float, t_start: float, t_end: float, stops: list,
                 min_step: float, max_num_steps: int, callbacks: Any, context: str, method: Any) -> None:
        super().__init__(t_start, t_end, max_num_steps, context, method)
        self.pi, self.stops, self.next_stop = pi, stops, 0
        self.min_step, self.max_step, self.dfactor = min_step, pi.max_step, pi.dfactor
        self.callbacks = callbacks
        # Smallest step still resolvable: relative to the times involved, so a problem scaled into
        # a tiny interval (say [0, 1e-14]) solves like the same problem on [0, 1].
        self.h_floor_scale = max(abs(t_start), abs(t_end), abs(t_end - t_start))
        self.h = self.h_try = math.copysign(min(max(abs(h), min_step), pi.max_step), self.direction)
        self.at_min_step = False

    @property
    def next_step(self) -> float | None:
        """The larger of the controller's proposal and the step the last one was cut short from."""
        return max(abs(self.h), abs(self.h_try))

    def propose(self) -> tuple[float, float]:
        self._count_attempt()
        t, h, direction, stops = self.t, self.h, self.direction, self.stops
        self.h_try = h
        if abs(h) < self.min_step:
            h = math.copysign(self.min_step, direction)
        while self.next_stop < len(stops) and direction * (stops[self.next_stop] - t) <= 0:
            self.next_stop += 1
        # A step that falls short of the end (or of a stop) by less than 1% of itself is
        # stretched to reach it (Hairer's DOPRI5 does the same), instead of leaving a sliver
        # that costs a whole step; never beyond max_step.
        reach = t + (h if abs(h) * STRETCH > self.max_step else h * STRETCH)
        if self.next_stop < len(stops) and direction * (reach - stops[self.next_stop]) >= 0:
            t_next, self.last = stops[self.next_stop], False
        else:
            self.last = direction * (reach - self.t_end) >= 0
            t_next = self.t_end if self.last else t + h
        # The step actually taken is the difference of two representable times, so replaying
        # the recorded grid (checkpointed, interpolating) reproduces this step bit for bit.
        self.h = t_next - t
        # min_step is a size asked for, not the difference of two times: t + min_step - t can
        # round to one ulp above min_step, and such a step must still count as at min_step
        # (or it would be rejected at that size forever).
        self.at_min_step = abs(h) <= self.min_step or abs(self.h) <= self.min_step
        if self.h == 0.0:
            raise fail(f"step size underflow at t={t:.6g}: the step is below the resolution of "
                       "t (t + h == t). options['first_step'] may be too small, or the "
                       "right-hand side changes too fast near this t; check func or loosen "
                       "rtol/atol.", self.context, self.method)
        return t, t_next

    def judge(self, ratio: float | None, step: Any) -> bool:
        assert ratio is not None  # the loop measures every adaptive step
        h, t = self.h, self.t
        if not math.isfinite(ratio):
            if not bool(torch.isfinite(step.k0).all()):
                raise fail(f"the right-hand side returned NaN/Inf at t={t:.6g} for a finite "
                           "state; check func (e.g. log/sqrt/division of the state) or its "
                           "parameters.", self.context, self.method)
            ratio = math.inf
        # A step no longer than min_step is accepted whatever its error (torchdiffeq's min_step).
        accepted = ratio <= 1.0 or (self.at_min_step and math.isfinite(ratio))
        if math.isfinite(ratio):
            self.h = self.pi.propose(h, ratio, accepted)
        else:
            self.h = h * self.dfactor
            self.pi.after_rejection = True
        callbacks = self.callbacks
        if accepted:
            if callbacks.accept is not None:
                callbacks.accept(t, step.y0, h)
            self._accept(step.t1)
            return True
        if callbacks.reject is not None:
            callbacks.reject(t, step.y0, h)
        self.rejected += 1
        # With min_step, only a non-finite error can reject a step of that size again.
        stuck = self.min_step > 0 and self.at_min_step
        if stuck or abs(self.h) <= 16 * math.ulp(max(abs(t), self.h_floor_scale)):
            why = ("the state or the right-hand side became NaN/Inf" if ratio == math.inf
                   else "the error estimate stays above tolerance")
            raise fail(f"step size underflow at t={t:.6g} (h={self.h:.3g}): {why}. The solution "
                       "may blow up in finite time, or the problem is too stiff for an "
                       "explicit method; loosen rtol/atol or check func.", self.context, self.method)
        return False
