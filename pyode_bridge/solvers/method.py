"""Methods that bring their own stepping loop (multistep, scipy) instead of a Butcher tableau.

A :class:`SolverMethod` sits in :data:`~pyode_bridge.solvers.METHODS` beside the tableaux and in
``SolverConfig.tableau``; :func:`~pyode_bridge.solvers.integrate` hands the whole solve to its
:meth:`~SolverMethod.integrate`, which keeps ``integrate``'s contract, so the forward solve and
every adjoint's backward solve run them unchanged.
"""
from __future__ import annotations

__all__ = ["SolverMethod"]


class SolverMethod:
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

    def integrate(self, rhs, y0, t_eval, config, *, q0=None, q_splits=None, atol_scale=1.0,
                  q_atol_scale=1.0, on_step=None, context="forward solve", check_finite_every_step=None):
        """Same contract as :func:`~pyode_bridge.solvers.integrate`; returns an ``IntegrateResult``."""
        raise NotImplementedError
