"""pyode-bridge: neural ODEs in PyTorch with fast, memory-lean and correct gradients.

>>> import torch, pyode_bridge as pob
>>> ys = pob.odeint(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
>>> ys.shape
torch.Size([5, 3])
"""
from . import nn
from .errors import AccuracyWarning, BackendUnavailableError, SolverError
from .nn import ODEBlock
from .odeint import odeint, odeint_adjoint, odeint_event
from .sensitivity import Backprop, Backsolve, Checkpointed, Interpolated, Interpolating, Sensitivity, TwoPassSensitivity
from .solvers import TABLEAUX, ButcherTableau, DenseSolution
from .stats import SolveStats

__version__ = "0.1.0"

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "SolveStats", "SolverError", "BackendUnavailableError",
    "AccuracyWarning", "Sensitivity", "TwoPassSensitivity", "Backprop", "Backsolve", "Checkpointed",
    "Interpolated", "Interpolating",
    "ButcherTableau", "TABLEAUX", "DenseSolution", "ODEBlock", "nn", "models", "data", "utils", "__version__",
]


# data, models and utils are training kit, not the solver: they load on first use, so that
# ``import pyode_bridge`` costs only the solver (``pob.models.build_model`` still works as written).
_LAZY_SUBMODULES = ("data", "models", "utils")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
