"""Ready-made models: image classifiers with ODE blocks (ANODE's ODE-ResNet / ODE-SqueezeNext, the
IRDM single-block net), a per-layer memory account, and the continuous normalising flow.

>>> import torch
>>> from pyode_bridge.models import build_model
>>> net = build_model("odenet", num_classes=10, width=8)
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""
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
from .memory import (
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

__all__ = [
    "MODELS", "build_model", "ODEClassifierMixin", "IRDMClassifier", "ODEResNet", "ODESqueezeNext",
    "ResidualODEFunc", "SqueezeNextODEFunc", "BasicBlock", "SqueezeNextBlock",
    "memory_report", "predict_backward_bytes", "measure_saved_bytes", "probe_func", "MemoryReport",
    "LayerMemory", "ODEBlockMemory", "BackwardMemory", "SavedBytes",
    "CNF", "CNFBlock", "CNFDynamics", "ConcatSquashMLP",
]

# The continuous normalising flow (FFJORD) lives in its own module.
from .cnf import CNF, CNFBlock, CNFDynamics, ConcatSquashMLP  # noqa: E402
