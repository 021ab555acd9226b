"""Every name ``odeint(method=...)`` accepts, in one place: the Runge-Kutta tableaux
(:data:`~pyode_bridge.solvers.TABLEAUX`, stepped by :func:`~pyode_bridge.solvers.integrate`) and the
methods with their own loop (:class:`~pyode_bridge.solvers.SolverMethod`: Adams, scipy)."""
from __future__ import annotations

from .adams import ADAMS_METHODS
from .scipy_solver import ScipyMethod
from .tableau import TABLEAUX

__all__ = ["METHODS"]

METHODS = {**TABLEAUX, **ADAMS_METHODS, "scipy_solver": ScipyMethod()}
