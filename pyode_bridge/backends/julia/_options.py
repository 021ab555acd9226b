"""Mapping pyode-bridge's arguments onto SciML's: methods, solver options, sensitivities.

Pure Python (no Julia): every mapping here is unit-tested without Julia.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

from ...solvers import SolverConfig

__all__ = ["JuliaSensitivity", "SENSITIVITY_KINDS", "DEFAULT_SENSITIVITY", "METHODS",
           "FIXED_METHODS", "resolve_sensitivity", "julia_method", "solver_kwargs"]

#: The gradient methods of the julia backend and the SciMLSensitivity algorithm behind each.
SENSITIVITY_KINDS = {
    "backsolve": "BacksolveAdjoint",
    "interpolating": "InterpolatingAdjoint",
    "quadrature": "QuadratureAdjoint",
    "gauss": "GaussAdjoint",
}
#: Used when ``sensitivity`` is None (SciMLSensitivity's documentation recommends GaussAdjoint).
DEFAULT_SENSITIVITY = "gauss"

#: pyode-bridge method name -> OrdinaryDiffEq algorithm. Other names are passed through as
#: OrdinaryDiffEq algorithm names ("Vern7", "Rodas5P", "KenCarp4", "FBDF", ...).
METHODS = {
    "tsit5": "Tsit5",
    "dopri5": "DP5",
    "rk4": "RK4",
    "euler": "Euler",
    "midpoint": "Midpoint",
    "bosh3": "BS3",
    "adaptive_heun": "Heun",
}
#: Methods that are fixed-step in pyode-bridge (OrdinaryDiffEq's RK4 and Midpoint are adaptive
#: by default; here they step like the torch backend's).
FIXED_METHODS = frozenset({"rk4", "euler", "midpoint"})

_JULIA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TORCH_ONLY = ("backprop", "checkpointed", "interpolated")


@dataclass(frozen=True)
class JuliaSensitivity:
    """A gradient method of the julia backend, for ``odeint(..., sensitivity=...)``.

    Args:
        kind: ``"backsolve"`` (BacksolveAdjoint: re-solves the state backwards, re-anchored at
            the output times), ``"interpolating"`` (InterpolatingAdjoint: reads the state from the
            forward solution), ``"quadrature"`` (QuadratureAdjoint: parameter gradient by
            quadrature) or ``"gauss"`` (GaussAdjoint: Gauss quadrature on the adjoint's steps).
        checkpointing: for ``interpolating`` and ``gauss``: keep only the states at the output
            times and re-solve each interval in the backward pass (less memory); for
            ``backsolve`` (default True): re-anchor the backward state at the output times.
        rtol, atol: tolerances of the adjoint solve (default: ``adjoint_rtol``/``adjoint_atol``,
            else the forward's).
    """

    kind: str = DEFAULT_SENSITIVITY
    checkpointing: bool | None = None
    rtol: float | None = None
    atol: float | None = None

    def __post_init__(self):
        if self.kind not in SENSITIVITY_KINDS:
            raise ValueError(_unsupported(self.kind))
        if self.checkpointing is not None and not isinstance(self.checkpointing, bool):
            raise ValueError(f"checkpointing must be True, False or None, got {self.checkpointing!r}")
        if self.kind == "quadrature" and self.checkpointing:
            raise ValueError("QuadratureAdjoint has no checkpointing; use kind='interpolating' or "
                             "'gauss' with checkpointing=True")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")

    @property
    def uses_checkpointing(self) -> bool:
        """The ``checkpointing`` flag passed to SciMLSensitivity."""
        if self.checkpointing is None:
            return self.kind == "backsolve"
        return self.checkpointing

    @property
    def sciml_name(self) -> str:
        return SENSITIVITY_KINDS[self.kind]


def _unsupported(name) -> str:
    supported = ", ".join(repr(k) for k in SENSITIVITY_KINDS)
    extra = ""
    if name in _TORCH_ONLY:
        extra = (f" ({name!r} differentiates through the torch solver's steps and exists only with "
                 "backend='torch')")
    return (f"sensitivity {name!r} is not offered by backend='julia'{extra}; it supports "
            f"{supported}, or pyode_bridge.backends.julia.JuliaSensitivity(kind, checkpointing=...)")


def resolve_sensitivity(sensitivity) -> JuliaSensitivity:
    """A :class:`JuliaSensitivity` from what the user passed to ``odeint``.

    Accepts None (the default, ``gauss``), a name, a :class:`JuliaSensitivity`, or the torch
    backend's :class:`~pyode_bridge.Backsolve` / :class:`~pyode_bridge.Interpolating` objects
    (their tolerances and ``checkpointing`` carry over; options with no SciML counterpart raise).
    """
    from ...sensitivity import Backsolve, Interpolating, Sensitivity

    if sensitivity is None:
        return JuliaSensitivity()
    if isinstance(sensitivity, JuliaSensitivity):
        return sensitivity
    if isinstance(sensitivity, str):
        if sensitivity not in SENSITIVITY_KINDS:
            raise ValueError(_unsupported(sensitivity))
        return JuliaSensitivity(sensitivity)
    if isinstance(sensitivity, Interpolating):
        if sensitivity.every is not None:
            raise ValueError("Interpolating(every=...) has no counterpart in SciMLSensitivity; "
                             "use Interpolating(checkpointing=True) (checkpoints at the output "
                             "times) with backend='julia'")
        return JuliaSensitivity("interpolating", checkpointing=sensitivity.checkpointing,
                                rtol=sensitivity.rtol, atol=sensitivity.atol)
    if isinstance(sensitivity, Backsolve):
        if sensitivity.on_instability != "warn" or sensitivity.guard_factor != 100.0:
            raise ValueError("Backsolve(on_instability=..., guard_factor=...) are torch-backend "
                             "options; with backend='julia' BacksolveAdjoint re-anchors the state "
                             "at the output times instead (checkpointing=True)")
        return JuliaSensitivity("backsolve", rtol=sensitivity.rtol, atol=sensitivity.atol)
    if isinstance(sensitivity, Sensitivity):
        raise ValueError(_unsupported(type(sensitivity).__name__.lower()))
    raise ValueError(_unsupported(sensitivity))


def julia_method(method: str) -> tuple[str, bool | None]:
    """``(OrdinaryDiffEq algorithm name, fixed_step)`` for a pyode-bridge or OrdinaryDiffEq name.

    ``fixed_step`` is None for passed-through names (the algorithm decides; a ``step_size``
    option makes it fixed-step).
    """
    if method in METHODS:
        return METHODS[method], method in FIXED_METHODS
    if not isinstance(method, str) or not _JULIA_NAME.match(method):
        raise ValueError(f"method {method!r} is neither a pyode-bridge method ({sorted(METHODS)}) "
                         "nor an OrdinaryDiffEq algorithm name such as 'Vern7' or 'Rodas5P'")
    return method, None


_DEFAULTS = {f.name: f.default for f in fields(SolverConfig)}
_CONTROLLER = ("safety", "ifactor", "dfactor", "beta")


def solver_kwargs(config: SolverConfig, t_eval: list, alg_fixed: bool | None,
                  adjoint: bool = False) -> dict:
    """Keyword arguments of ``PyodeBridge.forward_solve``/``adjoint_solve`` for ``config``.

    Tolerances always go explicitly (SciMLSensitivity's own adjoint defaults are loose).
    Fixed-step methods step on ``t`` itself unless ``step_size`` is given, as on the torch
    backend: ``dt`` is then the whole span and every output time is a ``tstops`` entry, which the
    integrator cannot step over.
    """
    changed = [k for k in _CONTROLLER if getattr(config, k) != _DEFAULTS[k]]
    if changed:
        raise ValueError(f"options {changed} tune the torch backend's step-size controller; "
                         "backend='julia' uses OrdinaryDiffEq's controller, drop them")
    if config.grid is not None:
        raise ValueError("options['grid'] is not supported by backend='julia'; use "
                         "options={'step_size': h} or the output times t as the grid")
    kw = {"abstol": float(config.atol), "reltol": float(config.rtol),
          "maxiters": int(config.max_num_steps), "dt": None, "adaptive": None, "dtmax": None}
    span = abs(t_eval[-1] - t_eval[0]) if len(t_eval) > 1 else 0.0
    if not adjoint:
        kw["tstops"] = None
    if config.step_size is not None:
        kw["dt"] = float(config.step_size)
        kw["adaptive"] = False
    elif alg_fixed:
        kw["adaptive"] = False
        if adjoint:
            # the adjoint stops at every output time already (its discrete loss callbacks)
            kw["dt"] = max((abs(b - a) for a, b in zip(t_eval, t_eval[1:])), default=span) or None
        else:
            kw["dt"] = span or None
            kw["tstops"] = [float(x) for x in t_eval]
    else:
        if config.first_step is not None and not adjoint:
            kw["dt"] = float(config.first_step)
    if math.isfinite(config.max_step):
        kw["dtmax"] = float(config.max_step)
    return kw
