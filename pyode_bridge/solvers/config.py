"""The solve's configuration: the method and the parsed ``options`` in named parts (step control,
time grid and stops, Newton's method, acceleration), built once by ``_validate.make_config``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Sequence

import torch

from .boundaries import StepCallbacks
from .method import SolverMethod
from .tableau import ButcherTableau

__all__ = ["SolverConfig", "ControlOptions", "TimeOptions", "NewtonOptions", "AccelOptions"]


@dataclass(frozen=True)
class ControlOptions:
    """Step control: what the adaptive steps are measured against and how they may change.

    ``rtol``/``atol``: the error test ``|err| <= atol + rtol * max(|y0|, |y1|)``.
    ``first_step``: the first step's size (None: the initial-step heuristic). ``max_step``,
    ``min_step``: adaptive steps are never longer, never shorter (a step of ``min_step`` is accepted
    whatever its error). ``max_num_steps``: the most step attempts (fixed grids: steps) per solve.
    ``safety``, ``ifactor``, ``dfactor``, ``beta``: the PI controller's coefficients
    (:class:`~pyode_bridge.solvers.PIController`).
    ``norm``: the error norm, ``norm(e_y (N,), e_q (Q,) or None) -> 0-d tensor`` of the error
    estimate scaled by ``atol + rtol * max(|y0|, |y1|)`` (``e_q``: the quadrature's, or None when it
    is not error-controlled); None is the built-in RMS per part (``norm_splits``, ``q_splits``).
    ``norm_splits``: the sizes of a tuple state's parts, each error-controlled on its own (see
    :func:`~pyode_bridge.solvers.error_ratio`).
    ``seminorm``: leave an integrated quadrature (an adjoint's parameter integral) out of the error
    norm (torchdiffeq's ``adjoint_options={"norm": "seminorm"}``). Cheaper backward solves, but the
    parameter gradient is then only as accurate as the step sequence chosen for the adjoint state
    happens to make it: a parameter integrand faster than the adjoint is under-resolved.
    ``adjoint_norm``: a backward solve's norm in torchdiffeq's convention, called with
    ``(t, *y_parts, *adj_y_parts, *adj_params)``; the adjoint methods turn it into their ``norm``.
    """

    rtol: float = 1e-7
    atol: float = 1e-9
    first_step: float | None = None
    max_step: float = math.inf
    min_step: float = 0.0
    max_num_steps: int = 10_000
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    beta: float | None = None
    norm: Callable | None = None
    norm_splits: tuple | None = None
    seminorm: bool = False
    adjoint_norm: Callable | None = None


@dataclass(frozen=True)
class TimeOptions:
    """The time axis: where steps start and end, where ``func`` is evaluated, and in which dtype.

    ``grid`` (a list of times) makes the solve fixed-step on exactly those step boundaries; this is
    also how adjoint methods replay a recorded adaptive step sequence. ``step_size`` builds a
    uniform grid for fixed-step methods, ``grid_constructor(func, y0, t) -> times`` any grid
    (torchdiffeq's option; called per solve, so a backward solve calls it for its own interval).
    ``step_t``: times adaptive steps land on; ``jump_t``: the same, and ``func`` is discontinuous
    there: the step ending at one sees ``func`` just before it, the step starting there just after.
    ``perturb``: every step evaluates ``func`` just inside its ends, never at a step boundary
    (torchdiffeq's ``perturb=True``). ``dtype``: the dtype ``func`` receives ``t`` in (None: the
    state's; ``options['dtype']``).
    """

    grid: list | None = None
    step_size: float | None = None
    grid_constructor: Callable | None = None
    step_t: tuple = ()
    jump_t: tuple = ()
    perturb: bool = False
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class NewtonOptions:
    """Newton's method on the stage equations of implicit tableaux
    (:mod:`~pyode_bridge.solvers.implicit`): ``tol`` (None: from ``rtol``), ``max_iters`` per
    step, ``jacobian`` (``"auto"``, ``"dense"`` or ``"krylov"``)."""

    tol: float | None = None
    max_iters: int = 10
    jacobian: str = "auto"


@dataclass(frozen=True)
class AccelOptions:
    """Opt-in acceleration: ``compile``, the ``torch.compile`` keywords of the compiled step (see
    :mod:`~pyode_bridge.solvers.compiled`; the solve's right-hand side carries the compiled step);
    ``cuda_graph``, capture the fixed-grid solve as CUDA graphs
    (:mod:`~pyode_bridge.solvers.cuda_graph`)."""

    compile: dict | None = None
    cuda_graph: bool = False


@dataclass(frozen=True)
class SolverConfig:
    """Everything that defines the discrete solve except the right-hand side and the data.

    ``method``: a :class:`ButcherTableau`, or a :class:`SolverMethod` (Adams, scipy). The options
    come in parts (each frozen: change one with ``dataclasses.replace``):
    ``control`` (:class:`ControlOptions`), ``time`` (:class:`TimeOptions`), ``newton``
    (:class:`NewtonOptions`), ``accel`` (:class:`AccelOptions`). ``interp``: the continuous
    extension between step boundaries: ``None`` the method's own (cubic Hermite where it has none),
    ``"cubic"`` cubic Hermite, ``"linear"`` linear. ``callbacks``: a
    :class:`~pyode_bridge.solvers.boundaries.StepCallbacks`.
    ``carry_last``, ``lean_fsal``: set by ``replay(grid, exact=True)``, a replay that repeats a
    recorded solve step for step to differentiate it (checkpointed): the recorded solve was adaptive
    and carried each step's last stage (``ButcherTableau.carry_last``), so the replay carries it
    too; a step leaves out its FSAL last stage where nothing reads it (no error control, no output
    inside the step, no next step starting from it); without ``on_step``, :func:`integrate` runs no
    NaN/Inf checks of it (the recorded solve ran them on the same numbers).
    """

    method: ButcherTableau | SolverMethod
    control: ControlOptions = field(default_factory=ControlOptions)
    time: TimeOptions = field(default_factory=TimeOptions)
    newton: NewtonOptions = field(default_factory=NewtonOptions)
    accel: AccelOptions = field(default_factory=AccelOptions)
    interp: str | None = None
    callbacks: StepCallbacks | None = None
    carry_last: bool = False
    lean_fsal: bool = False

    @cached_property  # read several times per integrate call, and the parts are frozen
    def adaptive(self) -> bool:
        """Whether steps are error-controlled: an adaptive method and no fixed grid."""
        t = self.time
        return self.method.adaptive and t.grid is None and t.step_size is None and t.grid_constructor is None

    def replay(self, grid: Sequence[float], exact: bool = False) -> SolverConfig:
        """The same method stepping exactly on ``grid`` (no error control, no callbacks; the
        ``jump_t``/``perturb`` evaluations are kept, so the replay is the recorded solve).
        ``exact``: also carry stages as the recorded solve did (``carry_last``) and skip FSAL stages
        nothing reads (``lean_fsal``); a segment after the first then starts from the recorded
        derivative (``integrate(first_stage=...)``)."""
        carry = exact and self.adaptive and getattr(self.method, "carry_last", False)
        time = replace(self.time, grid=list(grid), step_size=None, grid_constructor=None)
        return replace(self, time=time, callbacks=None, carry_last=carry, lean_fsal=exact)

    def with_control(self, **changes: Any) -> SolverConfig:
        """The same configuration with ``control``'s fields in ``changes`` replaced."""
        return replace(self, control=replace(self.control, **changes))

    def with_tolerances(self, rtol: float | None = None, atol: float | None = None) -> SolverConfig:
        """The same configuration with ``rtol``/``atol`` replaced where given."""
        c = self.control
        return self.with_control(rtol=c.rtol if rtol is None else rtol, atol=c.atol if atol is None else atol)
