"""Neural-network building blocks: the :class:`ODEBlock` layer and time-dependent layers for ODE
right-hand sides.

>>> import torch, pyode_bridge as pob
>>> from pyode_bridge.nn import ODEBlock, ConcatSquashLinear
>>> class F(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.l = ConcatSquashLinear(3, 3)
...     def forward(self, t, x):
...         return torch.tanh(self.l(t, x))
>>> block = ODEBlock(F(), sensitivity="interpolated")
>>> block(torch.randn(5, 3)).shape
torch.Size([5, 3])
"""
from .block import ODEBlock, collect_stats, ode_blocks
from .layers import ConcatConv2d, ConcatSquashLinear, ODEConvFunc

__all__ = ["ODEBlock", "collect_stats", "ode_blocks", "ConcatSquashLinear", "ConcatConv2d",
           "ODEConvFunc"]
