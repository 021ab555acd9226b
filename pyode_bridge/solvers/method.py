"""Methods that are not a Butcher tableau (multistep, scipy), and the stepper contract of the
shared loop, :func:`~pyode_bridge.solvers.integrate`, that the forward solve and every adjoint's
backward solve run."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence

from .._types import RHS, FlatState, Quadrature, Times

if TYPE_CHECKING:
    from .config import SolverConfig
    from .dense import DenseStep
    from .loop import IntegrateResult

__all__ = ["SolverMethod", "Stepper"]


class Stepper(Protocol):
    """What the loop asks of a method's stepper (``RKStepper``, ``AdamsStepper``): diffrax's
    ``init``/``step`` as an object that keeps its state.

    The constructor is ``init``: ``(rhs, method, config, y0 (N,), q0 (Q,) or None, first_stage,
    atol, t_start, t_end, context)``. ``y``/``q``: the state and quadrature at the step control's
    ``t``. ``attempt(t0, t1)``: a step (``t0``, ``t1``, ``y_new`` ``(N,)``, ``dq``, ``q1``,
    ``dense()``: see :class:`~pyode_bridge.solvers.util.Outputs`) that leaves the state alone, so
    a rejected step is retried from it; ``accept(step)`` makes it the state (and the newest entry
    of a history); ``finish()``, after the last step, reports on the whole solve and returns the
    derivative a next step would start from (``IntegrateResult.carried``), or None.
    """

    rhs: RHS
    y: FlatState
    q: Quadrature | None

    def first_stage(self) -> Any: ...

    def attempt(self, t0: float, t1: float) -> Any: ...

    def accept(self, step: Any) -> None: ...

    def finish(self) -> Any: ...


class SolverMethod(abc.ABC):
    """A solver family that is not a Butcher tableau, stepped by the loop through its ``stepper``
    (unless ``own_loop``: then its :meth:`integrate` is the solve). Subclasses are frozen
    dataclasses with a ``name`` field.

    Class attributes:
        order: nominal order of the method (informational, as ``ButcherTableau.order``).
        adaptive: whether it chooses its own steps (then ``step_size``/``grid`` do not apply).
        OPTIONS: the ``options=`` keys the method itself reads (besides the generic ones).
        stepper: the :class:`Stepper` class (its constructor is ``init``).
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
