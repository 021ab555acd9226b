"""Gradient methods ("sensitivities"): one strategy object per method, chosen with
``odeint(..., sensitivity=...)``."""
from __future__ import annotations

from .backprop import Backprop
from .backsolve import Backsolve
from .base import BackwardMemory, Problem, Sensitivity, SolveSize, TwoPassSensitivity
from .checkpointed import Checkpointed
from .interpolated import Interpolated
from .interpolating import Interpolating

__all__ = ["Sensitivity", "TwoPassSensitivity", "Problem", "SolveSize", "BackwardMemory", "Backprop",
           "Backsolve", "Interpolated", "Interpolating", "Checkpointed", "SENSITIVITIES", "resolve_sensitivity"]

#: The gradient methods by name, from the most memory to the least (memory reports list them so).
SENSITIVITIES: dict[str, type[Sensitivity]] = {
    "backprop": Backprop,
    "checkpointed": Checkpointed,
    "interpolated": Interpolated,
    "interpolating": Interpolating,
    "backsolve": Backsolve,
}


def resolve_sensitivity(sensitivity) -> Sensitivity:
    """A :class:`Sensitivity` from a name (``"backprop"``, ...) or an instance."""
    if isinstance(sensitivity, Sensitivity):
        return sensitivity
    if isinstance(sensitivity, str) and sensitivity in SENSITIVITIES:
        return SENSITIVITIES[sensitivity]()
    raise ValueError(f"unknown sensitivity {sensitivity!r}; use one of {sorted(SENSITIVITIES)} "
                     "or an instance such as pyode_bridge.Interpolated(nodes=16)")
