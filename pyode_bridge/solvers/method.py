"""Methods that bring their own stepping loop (multistep, scipy) instead of a Butcher tableau.

A :class:`SolverMethod` sits in :data:`~pyode_bridge.solvers.METHODS` beside the tableaux and in
``SolverConfig.method``; :func:`~pyode_bridge.solvers.integrate` hands the whole solve to its
:meth:`~SolverMethod.integrate`, which keeps ``integrate``'s contract, so the forward solve and
every adjoint's backward solve run them unchanged.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .._types import RHS, FlatState, Quadrature, Times

if TYPE_CHECKING:
    from .config import SolverConfig
    from .dense import DenseStep
    from .loop import IntegrateResult

__all__ = ["SolverMethod"]


class SolverMethod(abc.ABC):
    """A solver family with its own loop. Subclasses are frozen dataclasses with a ``name`` field.

    Class attributes:
        order: nominal order of the method (informational, as ``ButcherTableau.order``).
        adaptive: whether it chooses its own steps (then ``step_size``/``grid`` do not apply).
        OPTIONS: the ``options=`` keys the method itself reads (besides the generic ones).
    """

    name: str
    adaptive: bool = False
    OPTIONS: tuple = ()

    @property
    def order(self) -> int:
        """Nominal order (informational); a subclass sets a class attribute or a property."""
        return 0

    def with_options(self, options: dict) -> "SolverMethod":
        """The method configured by its own keys of ``options``, which are popped (validated,
        ``ValueError`` naming the fix on bad values)."""
        return self

    @abc.abstractmethod
    def integrate(self, rhs: RHS, y0: FlatState, t_eval: Times, config: SolverConfig, *,
                  q0: Quadrature | None = None, q_splits: Sequence[int] | None = None,
                  atol_scale: float | FlatState = 1.0, q_atol_scale: float = 1.0,
                  on_step: Callable[[DenseStep], Any] | None = None, context: str = "forward solve",
                  check_finite_every_step: bool | None = None) -> IntegrateResult:
        """Same contract as :func:`~pyode_bridge.solvers.integrate`: states at ``t_eval`` from
        ``y0 (N,)``, with the quadrature ``q0 (Q,)`` where given."""
