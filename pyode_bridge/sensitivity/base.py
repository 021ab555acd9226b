"""The sensitivity (gradient method) interface and the problem every method receives."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .._state import FlatRHS, StateSpec
from ..errors import AccuracyWarning, SolverError
from ..solvers import SolverConfig
from ..stats import SolveStats

__all__ = ["Problem", "Sensitivity", "GUARD_POLICIES", "check_policy", "guard_alarm"]

#: What a gradient method's guard does when its measure says the gradient may be off.
GUARD_POLICIES = ("warn", "raise", "ignore")


def check_policy(option: str, value) -> str:
    """``value`` if it is one of :data:`GUARD_POLICIES`, else a ValueError naming ``option``."""
    if value not in GUARD_POLICIES:
        raise ValueError(f"{option} must be one of {GUARD_POLICIES}, got {value!r}")
    return value


def guard_alarm(policy: str, msg: str, stacklevel: int) -> None:
    """A guard's alarm under ``policy``: raise :class:`~pyode_bridge.SolverError` (``"raise"``),
    warn (``"warn"``; ``stacklevel`` counts from the caller), or nothing (``"ignore"``)."""
    if policy == "raise":
        raise SolverError(msg)
    if policy == "warn":
        warnings.warn(msg, AccuracyWarning, stacklevel=stacklevel + 1)


@dataclass
class Problem:
    """A validated solve, in the flat form the solvers use.

    Attributes:
        rhs: the wrapped ``func`` (flat in, flat out, counts evaluations).
        spec: how the flat state maps to the user's tensor / tuple.
        t_eval: output times as Python floats (strictly monotone).
        config: forward solver configuration.
        adjoint_config: solver configuration for backward solves (tolerances may differ).
        params: tensors the gradient is returned for besides ``y0`` (adjoint methods).
        stats: counters filled in place.
    """

    rhs: FlatRHS
    spec: StateSpec
    t_eval: list
    config: SolverConfig
    adjoint_config: SolverConfig
    params: tuple
    stats: SolveStats

    @property
    def method(self) -> str:
        return self.config.tableau.name


class Sensitivity:
    """A gradient method: a strategy object that turns a :class:`Problem` into outputs ``(T, N)``
    whose backward pass computes the gradient its own way.

    Subclasses either override :meth:`solve` (``Backprop``) or implement :meth:`forward_pass` and
    :meth:`backward_pass`, which :class:`~pyode_bridge.sensitivity._function.AdjointFunction` wraps
    in one ``torch.autograd.Function``.
    """

    name = "base"

    def solve(self, prob: Problem, y0: torch.Tensor) -> torch.Tensor:
        """Outputs at ``prob.t_eval``, shape ``(T, N)``, differentiable w.r.t. ``y0`` and params."""
        from ._function import AdjointFunction

        return AdjointFunction.apply(self, prob, y0, *prob.params)

    def forward_pass(self, prob: Problem, y0: torch.Tensor):
        """Forward solve without a graph. Returns ``(ys (T, N), saved)`` with ``saved`` a
        :class:`~pyode_bridge.sensitivity._function.Saved` (tensors autograd keeps for the backward,
        plus plain metadata)."""
        raise NotImplementedError

    def backward_pass(self, prob: Problem, saved, ys: torch.Tensor, grad_ys: torch.Tensor):
        """Returns ``(grad_y0 (N,), [grad per param or None])``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
