"""Step boundaries a solve must respect: times the steps land on (``step_t``, ``jump_t``), and
evaluations of ``func`` moved just inside a step (``perturb``, and both sides of a ``jump_t``).

A right-hand side with a discontinuity in time at ``t_j`` (a forcing that switches on, a piecewise
schedule) has two values there. A step that ends at ``t_j`` must see the one from before it and the
step that starts there the one after it; evaluating exactly at ``t_j`` would give one side to both.
torchdiffeq solves this by calling ``func`` at the next representable time inside the step
(``Perturb.NEXT``/``PREV``); so does :func:`boundary_rhs`, in the dtype ``func`` receives ``t`` in,
so that ``func`` never sees the boundary itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["nudge", "boundary_rhs", "stops_between", "jumps_within", "merge_times", "StepCallbacks"]


class StepCallbacks:
    """Functions called by the stepping loop, each as ``cb(t0: float, y0: Tensor[N], h: float)``:
    ``step`` before every step attempt, ``accept``/``reject`` after an adaptive step's error test
    (torchdiffeq's ``callback_step``, ``callback_accept_step``, ``callback_reject_step``)."""

    def __init__(self, step=None, accept=None, reject=None):
        self.step, self.accept, self.reject = step, accept, reject

    def __bool__(self) -> bool:
        return any(c is not None for c in (self.step, self.accept, self.reject))


def _as_dtype(t: float, dtype) -> float:
    """``t`` rounded to ``dtype`` (what ``func`` receives), as a Python float."""
    if dtype is None or dtype == torch.float64:
        return t
    if dtype == torch.float32:
        return float(np.float32(t))
    return float(torch.tensor(t, dtype=dtype))


def nudge(t: float, direction: float, dtype) -> float:
    """The representable time of ``dtype`` next to ``t`` (rounded to ``dtype``) in ``direction``
    (+1 or -1), as a Python float that ``dtype`` represents exactly."""
    if dtype is None or dtype == torch.float64:
        return math.nextafter(t, direction * math.inf)
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(t), np.float32(direction * np.inf)))
    x = torch.tensor(t, dtype=dtype)
    return float(torch.nextafter(x, torch.tensor(direction * math.inf, dtype=dtype)))


def boundary_rhs(rhs, t0: float, t1: float, dtype, at_start: bool, at_end: bool):
    """``rhs`` for one step from ``t0`` to ``t1`` with evaluations at its ends moved inside it.

    A stage time that ``func`` would receive as ``t0`` (after rounding to ``dtype``) is replaced by
    the next representable time towards ``t1`` when ``at_start``; one it would receive as ``t1`` by
    the previous one when ``at_end``. Returns ``rhs`` itself when neither applies.
    """
    if not (at_start or at_end):
        return rhs
    direction = 1.0 if t1 >= t0 else -1.0
    r0, r1 = _as_dtype(t0, dtype), _as_dtype(t1, dtype)
    inside0, inside1 = nudge(t0, direction, dtype), nudge(t1, -direction, dtype)

    def moved(t, y):
        r = _as_dtype(t, dtype)
        if at_start and r == r0:
            t = inside0
        elif at_end and r == r1:
            t = inside1
        return rhs(t, y)

    return moved


def stops_between(times, t_start: float, t_end: float) -> list:
    """The times of ``times`` strictly between ``t_start`` and ``t_end``, in the direction of
    integration, without repeats."""
    lo, hi = sorted((t_start, t_end))
    inside = {float(x) for x in times if lo < float(x) < hi}
    return sorted(inside, reverse=t_end < t_start)


def merge_times(times, extra) -> list:
    """The monotone ``times`` with the times ``extra`` added, in the same direction, without repeats."""
    return sorted(set(times) | set(extra), reverse=times[-1] < times[0])


def jumps_within(times, t_start: float, t_end: float) -> set:
    """The times of ``times`` in the closed interval between ``t_start`` and ``t_end``: a solve
    evaluates ``func`` just inside its interval at these (a jump at an end of a backward solve's
    interval included)."""
    if not times:  # the common case, on every integrate call
        return set()
    lo, hi = sorted((t_start, t_end))
    return {float(x) for x in times if lo <= float(x) <= hi}
