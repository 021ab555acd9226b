"""pyode-bridge: neural ODEs in PyTorch with fast, memory-lean and correct gradients.

>>> import torch, pyode_bridge as pob
>>> ys = pob.odeint(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
>>> ys.shape
torch.Size([5, 3])
"""
from . import data, models, nn, utils  # noqa: E402  (submodules; they import the names above)
from .errors import AccuracyWarning, BackendUnavailableError, SolverError
from .events import odeint_event
from .nn import ODEBlock
from .odeint import odeint, odeint_adjoint
from .sensitivity import Backprop, Backsolve, Checkpointed, Interpolated, Interpolating, Sensitivity
from .solvers import TABLEAUX, ButcherTableau, DenseSolution
from .stats import SolveStats

__version__ = "0.1.0"

__all__ = [
    "odeint", "odeint_adjoint", "odeint_event", "SolveStats", "SolverError", "BackendUnavailableError",
    "AccuracyWarning", "Sensitivity", "Backprop", "Backsolve", "Checkpointed", "Interpolated", "Interpolating",
    "ButcherTableau", "TABLEAUX", "DenseSolution", "ODEBlock", "nn", "models", "data", "utils", "__version__",
]
