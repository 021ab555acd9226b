"""Mapping pyode-bridge's arguments onto SciML's: methods, solver options, sensitivities.

Pure Python (no Julia): every mapping here is unit-tested without Julia.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from ...solvers import ControlOptions, SolverConfig

__all__ = ["JuliaSensitivity", "SENSITIVITY_KINDS", "DEFAULT_SENSITIVITY", "METHODS",
           "FIXED_METHODS", "TORCH_ONLY_METHODS", "resolve_sensitivity", "julia_method", "solver_kwargs",
           "is_julia_value", "method_label", "check_checkpointing"]

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
    "heun2": "Heun",
    "implicit_euler": "ImplicitEuler",
    "implicit_midpoint": "ImplicitMidpoint",
    "trapezoid": "Trapezoid",
    "radauIIA3": "RadauIIA3",
    "radauIIA5": "RadauIIA5",
    "sdirk2": "SDIRK2",
    "trbdf2": "TRBDF2",
}
#: Methods that are fixed-step in pyode-bridge (OrdinaryDiffEq's RK4 and Midpoint are adaptive
#: by default; here they step like the torch backend's).
FIXED_METHODS = frozenset({"rk4", "euler", "midpoint", "heun2", "implicit_euler", "implicit_midpoint",
                           "trapezoid", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2"})
#: Torch-backend methods without an OrdinaryDiffEq twin of the same tableau.
TORCH_ONLY_METHODS = frozenset({"dopri8", "fehlberg2", "heun3", "gl4", "gl6"})

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
    from ...sensitivity import Sensitivity

    if sensitivity is None:
        return JuliaSensitivity()
    if isinstance(sensitivity, JuliaSensitivity):
        return sensitivity
    if isinstance(sensitivity, str):
        if sensitivity not in SENSITIVITY_KINDS:
            raise ValueError(_unsupported(sensitivity))
        return JuliaSensitivity(sensitivity)
    if isinstance(sensitivity, Sensitivity):
        counterpart = sensitivity.sciml_counterpart()
        if counterpart is None:
            raise ValueError(_unsupported(type(sensitivity).__name__.lower()))
        kind, settings = counterpart
        return JuliaSensitivity(kind, **settings)
    raise ValueError(_unsupported(sensitivity))


def is_julia_value(x) -> bool:
    """Whether ``x`` is a Julia object wrapped by juliacall (e.g. diffeqpy's ``de.Vern7()``).

    Checked without importing juliacall: such a value can only exist once juliacall has been
    imported and Julia started, and juliacall then defines ``juliacall.ValueBase``.
    """
    jc = sys.modules.get("juliacall")
    base = getattr(jc, "ValueBase", None) if jc is not None else None
    return isinstance(base, type) and isinstance(x, base)


def method_label(method) -> str:
    """A short name for messages: the name itself, or a Julia algorithm's type name."""
    if isinstance(method, str):
        return method
    text = str(method)  # Julia's printing: "Vern7(; stage_limiter! = ...)"
    return text.split("(")[0].split("{")[0].strip() or type(method).__name__


def julia_method(method) -> tuple:
    """``(algorithm, fixed_step)`` for a pyode-bridge name, an OrdinaryDiffEq name or a juliacall
    algorithm object.

    ``algorithm`` is an OrdinaryDiffEq algorithm name or the juliacall object itself (Julia checks
    it: an ODE algorithm that does not push ForwardDiff dual numbers into the torch callback).
    ``fixed_step`` is None for passed-through names and objects (the algorithm decides; a
    ``step_size`` option makes it fixed-step).
    """
    if is_julia_value(method):
        return method, None
    if isinstance(method, str) and method in METHODS:
        return METHODS[method], method in FIXED_METHODS
    if isinstance(method, str) and method in TORCH_ONLY_METHODS:
        raise ValueError(f"method {method!r} has no OrdinaryDiffEq twin on backend='julia'; use "
                         "backend='torch', or an OrdinaryDiffEq algorithm name such as 'DP8', "
                         "'Vern8' or 'RadauIIA5'")
    if not isinstance(method, str) or not _JULIA_NAME.match(method):
        raise ValueError(f"method {method!r} is neither a pyode-bridge method ({sorted(METHODS)}), "
                         "an OrdinaryDiffEq algorithm name such as 'Vern7' or 'Rodas5P', nor a "
                         "Julia algorithm object (e.g. diffeqpy's de.Vern7())")
    return method, None


def check_checkpointing(sens: JuliaSensitivity, forward_kwargs: dict, method) -> None:
    """Refuse a fixed-step forward solve with checkpointed interpolating/gauss adjoints.

    Their backward pass re-solves each checkpoint interval with the forward's algorithm and
    tolerances only, not its step size: Euler then fails ("Fixed timestep methods require a choice
    of dt") and RK4/Midpoint re-solve adaptively, so the gradient would belong to another
    discretisation than the forward solve. (Fixed-step algorithm objects are checked in Julia.)
    """
    if (sens.kind in ("interpolating", "gauss") and sens.uses_checkpointing
            and forward_kwargs.get("adaptive") is False):
        raise ValueError(
            f"a fixed-step forward solve (method {method_label(method)!r}) cannot be used with "
            f"checkpointed {sens.kind!r} adjoints on backend='julia': SciMLSensitivity re-solves "
            "each checkpoint interval without the step size, so the gradient would crash (Euler) "
            f"or belong to an adaptive re-solve (RK4, Midpoint). Use JuliaSensitivity("
            f"{sens.kind!r}, checkpointing=False), 'quadrature' or 'backsolve', or an adaptive "
            "method such as 'tsit5'.")


_CONTROLLER = ("safety", "ifactor", "dfactor", "beta")


def solver_kwargs(config: SolverConfig, t_eval: list, alg_fixed: bool | None,
                  adjoint: bool = False) -> dict:
    """Keyword arguments of ``PyodeBridge.forward_solve``/``adjoint_solve`` for ``config``.

    Tolerances always go explicitly (SciMLSensitivity's own adjoint defaults are loose).
    Fixed-step methods step on ``t`` itself unless ``step_size`` is given, as on the torch
    backend: ``dt`` is then the whole span and every output time is a ``tstops`` entry, which the
    integrator cannot step over.
    """
    changed = [k for k in _CONTROLLER if getattr(config.control, k) != getattr(ControlOptions, k)]
    if changed:
        raise ValueError(f"options {changed} tune the torch backend's step-size controller; "
                         "backend='julia' uses OrdinaryDiffEq's controller, drop them")
    if config.time.grid is not None:
        raise ValueError("options['grid'] is not supported by backend='julia'; use "
                         "options={'step_size': h} or the output times t as the grid")
    kw: dict[str, Any] = {"abstol": float(config.control.atol), "reltol": float(config.control.rtol),
          "maxiters": int(config.control.max_num_steps), "dt": None, "adaptive": None, "dtmax": None}
    span = abs(t_eval[-1] - t_eval[0]) if len(t_eval) > 1 else 0.0
    if not adjoint:
        kw["tstops"] = None
    if config.time.step_size is not None:
        kw["dt"] = float(config.time.step_size)
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
        if config.control.first_step is not None and not adjoint:
            kw["dt"] = float(config.control.first_step)
    if math.isfinite(config.control.max_step):
        kw["dtmax"] = float(config.control.max_step)
    return kw
