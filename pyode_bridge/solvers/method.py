"""Methods that are not a Butcher tableau (multistep, scipy), and the stepper contract of the
shared loop.

A :class:`SolverMethod` sits in :data:`~pyode_bridge.solvers.METHODS` beside the tableaux and in
``SolverConfig.tableau``. :func:`~pyode_bridge.solvers.integrate` steps it like a tableau, through
the :class:`Stepper` its ``stepper`` class makes (a multistep method's history is the stepper's
state), unless it drives its own loop (``own_loop``, scipy): then the loop hands the whole solve
to its :meth:`~SolverMethod.integrate`, which keeps ``integrate``'s contract. Either way the
forward solve and every adjoint's backward solve run it unchanged.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence

from .._types import RHS, FlatState, Quadrature, Times

if TYPE_CHECKING:
    from .dense import DenseStep
    from .loop import IntegrateResult, SolverConfig

__all__ = ["SolverMethod", "Stepper"]


class Stepper(Protocol):
    """What :func:`~pyode_bridge.solvers.integrate` asks of a method's stepper (``RKStepper``,
    ``AdamsStepper``): diffrax's ``init``/``step`` as an object that keeps its state.

    ``init`` is the constructor, ``(rhs, method, config, y0 (N,), q0 (Q,) or None, first_stage,
    atol, t_start, t_end, context)``; ``y``/``q``: the state ``(N,)`` and quadrature ``(Q,)`` (or
    None) at the step control's ``t``; ``first_stage()``: the derivative at the start (shaped like
    an ``rhs`` return); ``attempt(t0, t1)``: a step from the current state (anything with ``t0``,
    ``t1``, ``y_new`` ``(N,)``, ``dq`` ``(Q,)`` or None, ``q1`` and ``dense()``, see
    :class:`~pyode_bridge.solvers.util.Outputs`) that changes nothing the next attempt sees but
    cached evaluations, so that a rejected step is retried from the same state; ``accept(step)``:
    make it the current state (and the newest entry of a history); ``finish()``: after the last
    step, what the method reports about the whole solve (a warning).
    """

    rhs: RHS
    y: FlatState
    q: Quadrature | None

    def first_stage(self) -> Any: ...

    def attempt(self, t0: float, t1: float) -> Any: ...

    def accept(self, step: Any) -> None: ...

    def finish(self) -> None: ...


class SolverMethod(abc.ABC):
    """A solver family that is not a Butcher tableau. Subclasses are frozen dataclasses with a
    ``name`` field, and give either ``stepper`` or ``own_loop = True`` with :meth:`integrate`.

    Class attributes:
        order: nominal order of the method (informational, as ``ButcherTableau.order``).
        adaptive: whether it chooses its own steps (then ``step_size``/``grid`` do not apply).
        OPTIONS: the ``options=`` keys the method itself reads (besides the generic ones).
        stepper: the :class:`Stepper` class the shared loop steps it with.
        own_loop: the method drives its own loop (:meth:`integrate`) and has no ``stepper``.
    """

    name: str
    adaptive: bool = False
    OPTIONS: tuple = ()
    stepper: ClassVar[Callable[..., Stepper]]
    own_loop: ClassVar[bool] = False

    @property
    def order(self) -> int:
        """Nominal order (informational); a subclass sets a class attribute or a property."""
        return 0

    def with_options(self, options: dict) -> "SolverMethod":
        """The method configured by its own keys of ``options``, which are popped (validated,
        ``ValueError`` naming the fix on bad values)."""
        return self

    def integrate(self, rhs: RHS, y0: FlatState, t_eval: Times, config: SolverConfig, *,
                  q0: Quadrature | None = None, q_splits: Sequence[int] | None = None,
                  atol_scale: float | FlatState = 1.0, q_atol_scale: float = 1.0,
                  on_step: Callable[[DenseStep], Any] | None = None, context: str = "forward solve",
                  check_finite_every_step: bool | None = None) -> IntegrateResult:
        """An ``own_loop`` method's solve, with the contract of
        :func:`~pyode_bridge.solvers.integrate`: states at ``t_eval`` from ``y0 (N,)``, with the
        quadrature ``q0 (Q,)`` where given."""
        raise NotImplementedError(f"method {self.name!r} is stepped by the shared loop (its stepper)")
