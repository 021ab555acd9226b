"""``backend="julia"``: SciML solvers and adjoints (SciMLSensitivity) for a PyTorch right-hand side.

Nothing here imports juliacall: Julia is started by the first julia solve (:func:`load_julia`),
never by ``import pyode_bridge``. See docs/julia.md for installation, environment variables and
first-run cost.

Public pieces:

- :func:`odeint_julia`: called by :func:`pyode_bridge.odeint` for ``backend="julia"``.
- :class:`JuliaSensitivity`: the gradient methods ``"backsolve"``, ``"interpolating"``,
  ``"quadrature"`` and ``"gauss"`` with their options (strings work too).
- :func:`julia_available`: whether Julia can be had, without starting it.
- :func:`load_julia`: start Julia now (e.g. to pay the start-up cost up front).
- :func:`install_cuda`: add GPU support (CUDA.jl) to the Julia environment, once, before Julia
  starts (or set ``PYODE_BRIDGE_JULIA_CUDA=1``); GPU support is opt-in.
"""
from ._loader import (
    CUDA_ENV,
    DOWNLOAD_ENV,
    MIN_JULIA,
    PROBE_TIMEOUT_S,
    JuliaThreadError,
    install_cuda,
    julia_available,
    julia_project_dir,
    load_julia,
    locate_julia,
    preflight,
)
from ._options import METHODS, SENSITIVITY_KINDS, JuliaSensitivity, resolve_sensitivity
from ._solve import odeint_julia

__all__ = [
    "odeint_julia", "JuliaSensitivity", "SENSITIVITY_KINDS", "METHODS", "resolve_sensitivity",
    "julia_available", "load_julia", "locate_julia", "preflight", "julia_project_dir",
    "install_cuda", "JuliaThreadError", "DOWNLOAD_ENV", "CUDA_ENV", "MIN_JULIA", "PROBE_TIMEOUT_S",
]
