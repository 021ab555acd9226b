"""Ready-made models: image classifiers with ODE blocks (ANODE's ODE-ResNet / ODE-SqueezeNext, the
IRDM single-block net) and the continuous normalising flow.

The memory account (``memory_report``, ``predict_backward_bytes``, ``measure_saved_bytes``, ...)
lives in :mod:`pyode_bridge.memory`; its names are re-exported here only so that code written
against ``pyode_bridge.models`` keeps working. Import them from :mod:`pyode_bridge.memory`.

>>> import torch
>>> from pyode_bridge.models import build_model
>>> net = build_model("odenet", num_classes=10, width=8)
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""
from ..memory import (
    BackwardMemory,
    LayerMemory,
    MemoryReport,
    ODEBlockMemory,
    SavedBytes,
    measure_saved_bytes,
    memory_report,
    predict_backward_bytes,
    probe_func,
)
from .classifiers import (
    MODELS,
    BasicBlock,
    IRDMClassifier,
    ODEClassifierMixin,
    ODEResNet,
    ODESqueezeNext,
    ResidualODEFunc,
    SqueezeNextBlock,
    SqueezeNextODEFunc,
    build_model,
)

__all__ = [
    "MODELS", "build_model", "ODEClassifierMixin", "IRDMClassifier", "ODEResNet", "ODESqueezeNext",
    "ResidualODEFunc", "SqueezeNextODEFunc", "BasicBlock", "SqueezeNextBlock",
    "memory_report", "predict_backward_bytes", "measure_saved_bytes", "probe_func", "MemoryReport",
    "LayerMemory", "ODEBlockMemory", "BackwardMemory", "SavedBytes",
    "CNF", "CNFBlock", "CNFDynamics", "ConcatSquashMLP",
]

# The continuous normalising flow (FFJORD) lives in its own module.
from .cnf import CNF, CNFBlock, CNFDynamics, ConcatSquashMLP  # noqa: E402
