"""The sensitivity (gradient method) interface and the problem every method receives."""
from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass

import torch

from .._state import FlatRHS, StateSpec
from .._types import FlatState, FlatTrajectory, Gradients
from ..errors import AccuracyWarning, SolverError
from ..solvers import SolverConfig
from ..stats import SolveStats
from ._function import AdjointFunction, Saved

__all__ = ["Problem", "Sensitivity", "TwoPassSensitivity", "SolveSize", "BackwardMemory", "GUARD_POLICIES",
           "check_policy", "guard_alarm"]

#: What a gradient method's guard does when its measure says the gradient may be off.
GUARD_POLICIES = ("warn", "raise", "ignore")


def check_policy(option: str, value: object) -> str:
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
    t_eval: list[float]
    config: SolverConfig
    adjoint_config: SolverConfig
    params: tuple[torch.Tensor, ...]
    stats: SolveStats

    @property
    def method(self) -> str:
        return self.config.method.name


@dataclass(frozen=True)
class SolveSize:
    """The sizes of one solve that a gradient method's kept-for-backward memory depends on.

    Attributes:
        state_bytes: bytes ``s`` of the state (all components, the whole batch).
        steps: accepted steps ``N`` of the forward solve.
        eval_saved_bytes: bytes ``g`` one evaluation of ``func`` saves for backward.
        stages: the tableau's stage count ``S``.
        fsal: 1 if a step reuses the last stage of the step before (FSAL or ``carry_last``), else 0.
        dense_coeffs: polynomial coefficients ``P`` per step of the tableau's dense output (3 for
            the cubic Hermite of tableaux without one).
        n_outputs: output times ``T``.
        param_bytes: bytes of ``func``'s parameters.
    """

    state_bytes: int
    steps: int
    eval_saved_bytes: int
    stages: int
    fsal: int
    dense_coeffs: int
    n_outputs: int
    param_bytes: int = 0

    @property
    def outputs_bytes(self) -> int:
        """The ``T`` stored outputs, ``T s`` (every method but backprop keeps them)."""
        return self.n_outputs * self.state_bytes

    @property
    def adjoint_work_bytes(self) -> int:
        """One backward solve's workspace: ``S + 2`` adjoint-sized vectors and ``S + 1``
        parameter-sized quadrature vectors."""
        return (self.stages + 2) * self.state_bytes + (self.stages + 1) * self.param_bytes


@dataclass
class BackwardMemory:
    """What one gradient method keeps for an ODE block's backward.

    Attributes:
        sensitivity: method name.
        kept_bytes: held from the forward until the backward runs (checkpoints, interpolation
            nodes, dense output, the autograd graph, stored outputs).
        peak_bytes: ``kept_bytes`` plus the largest transient during the backward (a recomputed
            segment's graph, one vector-Jacobian product's graph, adjoint solver stages).
        detail: the formula, in states ``s`` and evaluation graphs ``g``.
    """

    sensitivity: str
    kept_bytes: int
    peak_bytes: int
    detail: str = ""


class Sensitivity(abc.ABC):
    """A gradient method: a strategy object that turns a :class:`Problem` into outputs ``(T, N)``
    whose backward pass computes the gradient its own way.

    A subclass implements :meth:`solve` (``Backprop``: autograd through the solver's operations),
    or derives from :class:`TwoPassSensitivity` and implements a forward and a backward pass. The
    class attributes below tell ``odeint`` and the event search what the method needs, so that they
    never ask which method it is.
    """

    name = "base"
    #: The gradient is autograd's through the forward solve's own operations: autograd finds
    #: ``func``'s parameters itself (``odeint`` passes ``Problem.params`` empty and walks no module),
    #: and the event search is differentiated where it runs.
    through_autograd: bool = False
    #: The backward integrates an adjoint system backwards in time, so it needs the adjoint solver
    #: configuration (``adjoint_rtol``, ``adjoint_method``, ...) and ``func``'s ``*_adjoint`` step
    #: callbacks.
    solves_backward: bool = True
    #: How the method runs in per-sample mode (:mod:`pyode_bridge._per_sample`), or None where it
    #: does not: ``"autograd"`` through the per-sample loop's operations, ``"replay"`` the recorded
    #: steps recomputed under autograd, and adjoints whose z(t) is ``"backsolve"`` re-solved
    #: backwards, ``"dense"`` read from the forward's dense output, ``"chebyshev"`` interpolated from
    #: per-row Chebyshev nodes.
    per_sample: str | None = None

    @abc.abstractmethod
    def solve(self, prob: Problem, y0: FlatState) -> FlatTrajectory:
        """Outputs at ``prob.t_eval``, shape ``(T, N)``, differentiable w.r.t. ``y0`` and params."""

    def predict_backward_bytes(self, size: SolveSize, *, nodes: int | str | None = None,
                               every: int | None = None, checkpointing: bool | None = None
                               ) -> BackwardMemory:
        """Bytes this method keeps for the backward of a solve of ``size``, and its peak during the
        backward (see :func:`pyode_bridge.memory.predict_backward_bytes`).

        ``nodes``, ``every`` and ``checkpointing`` override the method's own settings where it has
        them (each method reads those it has and ignores the rest).
        """
        raise ValueError(f"no memory model for sensitivity {self.name!r}: its class must implement "
                         "Sensitivity.predict_backward_bytes")

    def sciml_counterpart(self) -> tuple[str, dict] | None:
        """The julia backend's equivalent: ``(kind, settings)`` for
        :class:`~pyode_bridge.backends.julia.JuliaSensitivity` (``kind`` one of its
        ``SENSITIVITY_KINDS``), or None where SciMLSensitivity has none. Raises ValueError for
        settings that have no counterpart."""
        return None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class TwoPassSensitivity(Sensitivity):
    """A gradient method with a backward of its own: :meth:`forward_pass` solves without a graph
    and saves what :meth:`backward_pass` needs; :class:`~pyode_bridge.sensitivity._function.AdjointFunction`
    wraps the two in one ``torch.autograd.Function`` (``checkpointed`` and the adjoint methods)."""

    def solve(self, prob: Problem, y0: FlatState) -> FlatTrajectory:
        return AdjointFunction.apply(self, prob, y0, *prob.params)

    @abc.abstractmethod
    def forward_pass(self, prob: Problem, y0: FlatState) -> tuple[FlatTrajectory, Saved]:
        """Forward solve without a graph from ``y0 (N,)``. Returns ``(ys (T, N), saved)`` with
        ``saved`` a :class:`~pyode_bridge.sensitivity._function.Saved` (tensors autograd keeps for
        the backward, plus plain metadata)."""

    @abc.abstractmethod
    def backward_pass(self, prob: Problem, saved: Saved, ys: FlatTrajectory, grad_ys: FlatTrajectory
                      ) -> Gradients:
        """From the outputs ``ys (T, N)`` and their gradients ``grad_ys (T, N)``, returns
        ``(grad_y0 (N,), [grad per param or None])``."""
