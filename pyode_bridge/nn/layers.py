"""Time-dependent layers for ODE right-hand sides: FFJORD's ``ConcatSquashLinear``, the
time-as-a-channel ``ConcatConv2d``, and ``ODEConvFunc``, the convolutional ODE function of the IRDM
classification experiments (Daulbaev et al., 2020, sec. B.1).

Every layer here is called as ``layer(t, x)`` with ``t`` a 0-d tensor (what ``odeint`` passes), or
a ``(B,)`` tensor holding row ``b``'s time for row ``b`` of ``x`` (what per-sample mode passes).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

__all__ = ["ConcatSquashLinear", "ConcatConv2d", "ODEConvFunc"]


def _layer_time(t, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype and device, shaped to broadcast against ``like``.

    The time buffer of a block and the state need not share a dtype (e.g. float64 time with a
    float32 state); the layer's arithmetic must happen in the state's dtype.

    Shapes: a 0-d or 1-element ``t`` -> ``(1,)``; a ``(B,)`` ``t`` with ``like`` ``(B, ...)`` ->
    ``(B, 1, ..., 1)`` (``like.dim()`` dimensions), row ``b``'s time for row ``b``.
    """
    t = torch.as_tensor(t).to(dtype=like.dtype, device=like.device)
    if t.numel() == 1:
        return t.reshape(1)
    if t.dim() != 1 or like.dim() == 0 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be 0-d (one time for the batch) or of shape (B,) with B = the input's "
                         f"leading dimension (row b's time for row b), got t of shape {tuple(t.shape)} "
                         f"for an input of shape {tuple(like.shape)}")
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


class ConcatSquashLinear(nn.Module):
    """FFJORD's concat-squash layer: ``(W z + b1) * sigmoid(t c + b2) + t b3``.

    ``W, b1`` are a ``Linear(dim_in, dim_out)`` (``_layer``), ``c, b2`` a ``Linear(1, dim_out)``
    (``_hyper_gate``) and ``b3`` a bias-free ``Linear(1, dim_out)`` (``_hyper_bias``); the attribute
    names are FFJORD's, so its state dicts load unchanged.

    Args:
        dim_in: input features ``D_in``.
        dim_out: output features ``D_out``.

    Shapes:
        ``forward(t, x)``: ``t`` 0-d (or 1-element) tensor, ``x`` ``(*, D_in)`` -> ``(*, D_out)``; or
        ``t`` ``(B,)``, ``x`` ``(B, *, D_in)`` -> ``(B, *, D_out)`` (row ``b`` at time ``t[b]``).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_gate = nn.Linear(1, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tt = _layer_time(t, x)
        # A (D_out,) gate and shift (one time) or a (B, 1, ..., D_out) one (per-row times)
        # broadcast over x's leading dimensions.
        gate = torch.sigmoid(self._hyper_gate(tt))
        return self._layer(x) * gate + self._hyper_bias(tt)


class ConcatConv2d(nn.Module):
    """A 2-D convolution whose input gets the time ``t`` as one extra constant channel (torchdiffeq's
    ``ConcatConv2d``): ``conv(cat([t * ones(B, 1, H, W), x], dim=1))``.

    Args:
        dim_in, dim_out: channels ``C_in`` (without the time channel) and ``C_out``.
        ksize, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        transpose: use ``nn.ConvTranspose2d`` (decoders).

    Shapes:
        ``forward(t, x)``: ``t`` 0-d or ``(B,)`` (row ``b``'s time), ``x`` ``(B, C_in, H, W)`` ->
        ``(B, C_out, H', W')``.
    """

    def __init__(self, dim_in: int, dim_out: int, ksize: int = 3, stride: int = 1, padding: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, transpose: bool = False):
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self._layer = conv(dim_in + 1, dim_out, kernel_size=ksize, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=bias)

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        tt = _layer_time(t, x).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return self._layer(torch.cat([tt, x], dim=1))


class ODEConvFunc(nn.Module):
    """The IRDM classification ODE function: ``conv2(relu(conv1(relu(x))))``, two 3x3 convolutions
    with weight normalisation and ReLU activations (sec. B.1: "two convolutional layers with 64
    input and output channels, ReLU activations, and weight normalizations").

    Args:
        channels: state channels ``C`` (64 in the paper).
        hidden: channels between the two convolutions (default ``channels``).
        time_dependent: concatenate ``t`` as an extra input channel of both convolutions
            (:class:`ConcatConv2d`); otherwise the dynamics are autonomous and ``t`` is ignored.
        weight_norm: reparametrise both convolution weights as ``g * v / ||v||`` with
            ``torch.nn.utils.parametrizations.weight_norm`` (norm over all but the output channel).

    Shapes:
        ``forward(t, x)``: ``t`` 0-d or ``(B,)`` (row ``b``'s time), ``x`` ``(B, C, H, W)`` ->
        ``(B, C, H, W)``.
    """

    def __init__(self, channels: int = 64, hidden: int | None = None, time_dependent: bool = False,
                 weight_norm: bool = True):
        super().__init__()
        hidden = channels if hidden is None else int(hidden)
        self.channels, self.hidden, self.time_dependent = int(channels), hidden, bool(time_dependent)
        self.conv1: nn.Module
        self.conv2: nn.Module
        inner: tuple[nn.Module, nn.Module]  # the convolutions that carry the weights
        if self.time_dependent:
            conv1, conv2 = ConcatConv2d(channels, hidden, 3, 1, 1), ConcatConv2d(hidden, channels, 3, 1, 1)
            self.conv1, self.conv2 = conv1, conv2
            inner = (conv1._layer, conv2._layer)
        else:
            self.conv1 = nn.Conv2d(channels, hidden, 3, 1, 1)
            self.conv2 = nn.Conv2d(hidden, channels, 3, 1, 1)
            inner = (self.conv1, self.conv2)
        if weight_norm:
            for conv in inner:
                _weight_norm(conv, name="weight", dim=0)
        self.act = nn.ReLU()

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            return self.conv2(t, self.act(self.conv1(t, self.act(x))))
        return self.conv2(self.act(self.conv1(self.act(x))))
