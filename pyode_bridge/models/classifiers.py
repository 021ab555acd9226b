"""Image classifiers with ODE blocks: ANODE's ODE-ResNet and ODE-SqueezeNext for CIFAR-10/100
(Gholami et al., 2019) and the single-block net of the IRDM classification experiments
(Daulbaev et al., 2020, sec. 4.3 and B.1).

In the ANODE nets each stage is an ordinary residual block (it changes the width and, from the
second stage on, halves the resolution with a stride-2 convolution + BatchNorm) followed by ODE
blocks whose right-hand side is the residual branch of that stage: a ResNet with every residual
update ``x + f(x)`` replaced by ``dz/dt = f(z)`` on ``[0, 1]``.

Every model here exposes the solve statistics of its ODE blocks after a forward / backward:
``model.ode_stats()`` (a summed :class:`~pyode_bridge.SolveStats`), ``model.nfe`` and
``model.nfe_backward``.
"""
from __future__ import annotations

from typing import cast

from torch import nn

from ..nn.block import ODEBlock, collect_stats, ode_blocks
from ..nn.layers import ODEConvFunc

__all__ = ["ODEClassifierMixin", "ResidualODEFunc", "SqueezeNextODEFunc", "BasicBlock",
           "SqueezeNextBlock", "ODEResNet", "ODESqueezeNext", "IRDMClassifier", "build_model",
           "MODELS"]


class ODEClassifierMixin:
    """Solve statistics of every :class:`~pyode_bridge.nn.ODEBlock` in the model."""

    def ode_blocks(self) -> list:
        """The model's ODE blocks, in registration order."""
        return ode_blocks(cast(nn.Module, self))  # mixed into nn.Module subclasses only

    def ode_stats(self):
        """Summed :class:`~pyode_bridge.SolveStats` of the last call of every ODE block."""
        return collect_stats(self)

    @property
    def nfe(self) -> int:
        """Right-hand side evaluations of all ODE blocks in the last forward."""
        return self.ode_stats().nfe_forward

    @property
    def nfe_backward(self) -> int:
        """Right-hand side evaluations / vector-Jacobian products of all ODE blocks in the last
        backward."""
        return self.ode_stats().nfe_backward


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind is None or kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or None, got {kind!r}")


def _block_kwargs(method, steps, rtol, atol, sensitivity, options, t) -> dict:
    fixed_steps = None if method in ("dopri5", "tsit5", "bosh3", "adaptive_heun") else steps
    return dict(t=t, method=method, steps=fixed_steps, rtol=rtol, atol=atol,
                sensitivity=sensitivity, options=options)


class ResidualODEFunc(nn.Module):
    """ANODE's ODE-ResNet right-hand side: ``norm(conv(relu(norm(conv(z)))))``, 3x3 convolutions.

    With ``norm="batch"`` (ANODE's choice) the function uses batch statistics in ``train()``
    mode, so it is a deterministic function of the batch and every gradient method is exact; the
    running statistics are also updated at every evaluation, including the recomputations of
    ``checkpointed``/adjoint backward passes (harmless, but they average over stage states).

    Args:
        channels: state channels ``C``.
        norm: ``"batch"`` (default), ``"group"`` or ``None``.

    Shapes:
        ``forward(t, z)``: ``z`` ``(B, C, H, W)`` -> ``(B, C, H, W)``; ``t`` is ignored.
    """

    def __init__(self, channels: int, norm: str | None = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = _norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, channels)
        self.relu = nn.ReLU()

    def forward(self, t, z):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(z)))))


def _sqnxt_mid(channels: int, reduction: float) -> tuple:
    """Widths of SqueezeNext's bottleneck: ``(C * r, C * r / 2)``, never below one channel."""
    a = max(1, int(channels * reduction))
    return a, max(1, int(channels * reduction * 0.5))


class SqueezeNextODEFunc(nn.Module):
    """ANODE's ODE-SqueezeNext right-hand side: SqueezeNext's separable bottleneck
    ``1x1 (C -> C/2), 1x1 (-> C/4), 1x3 (-> C/2), 3x1 (-> C/2), 1x1 (-> C)``, each followed by
    BatchNorm and ReLU.

    Args:
        channels: state channels ``C``.
        norm: ``"batch"`` (default), ``"group"`` or ``None``.

    Shapes:
        ``forward(t, z)``: ``z`` ``(B, C, H, W)`` -> ``(B, C, H, W)``; ``t`` is ignored.
    """

    def __init__(self, channels: int, norm: str | None = "batch"):
        super().__init__()
        a, b = _sqnxt_mid(channels, 0.5)
        self.body = _sqnxt_body(channels, channels, a, b, 1, norm)

    def forward(self, t, z):
        return self.body(z)


def _sqnxt_body(c_in: int, c_out: int, a: int, b: int, stride: int, norm) -> nn.Sequential:
    def cbr(i, o, k, s, p):
        return [nn.Conv2d(i, o, k, s, p), _norm(norm, o), nn.ReLU()]

    return nn.Sequential(*cbr(c_in, a, 1, stride, 0), *cbr(a, b, 1, 1, 0), *cbr(b, a, (1, 3), 1, (0, 1)),
                         *cbr(a, a, (3, 1), 1, (1, 0)), *cbr(a, c_out, 1, 1, 0))


class BasicBlock(nn.Module):
    """An ordinary ResNet basic block (the stage transition of the ODE-ResNet): ``relu(F(x) + S(x))``
    with ``F`` = conv3x3(stride)-BN-ReLU-conv3x3-BN and ``S`` the identity or a strided 1x1 conv + BN.

    Shapes:
        ``(B, C_in, H, W)`` -> ``(B, C_out, H / stride, W / stride)``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str | None = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          _norm(norm, c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class SqueezeNextBlock(nn.Module):
    """An ordinary SqueezeNext block (the stage transition of the ODE-SqueezeNext), with a strided
    1x1 conv + BN shortcut when the shape changes. The bottleneck keeps all channels on a stride-2
    block, a quarter when narrowing, half otherwise (SqueezeNext's rule).

    Shapes:
        ``(B, C_in, H, W)`` -> ``(B, C_out, H / stride, W / stride)``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str | None = "batch"):
        super().__init__()
        reduction = 1.0 if stride == 2 else (0.25 if c_in > c_out else 0.5)
        a, b = _sqnxt_mid(c_in, reduction)
        self.body = _sqnxt_body(c_in, c_out, a, b, stride, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), _norm(norm, c_out),
                                          nn.ReLU())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ODEResNet(ODEClassifierMixin, nn.Module):
    """ANODE's ODE-ResNet for CIFAR: stem conv3x3-BN-ReLU, then ``len(widths)`` stages of one
    :class:`BasicBlock` (stride 1 for the first stage, 2 after) and ``ode_blocks_per_stage``
    :class:`~pyode_bridge.nn.ODEBlock` s of :class:`ResidualODEFunc`, global average pooling and a
    linear head. The default ``width=64, num_stages=4, ode_blocks_per_stage=1`` is ANODE's
    ResNet-18 layout (blocks ``[2, 2, 2, 2]``: one ordinary + one ODE block per stage).

    Args:
        num_classes: classes ``K`` (10 or 100 for CIFAR).
        in_channels: image channels.
        width: channels of the first stage; stage ``i`` has ``width * 2**i``.
        num_stages: number of stages.
        ode_blocks_per_stage: ODE blocks after each stage's transition block.
        method, steps: ODE solver and, for fixed-step methods, steps ``Nt`` on ``[0, 1]``
            (ANODE: Euler/RK2(``"midpoint"``)/RK4 with ``Nt = 2`` by default).
        rtol, atol, options: for adaptive methods / extra solver options.
        sensitivity: gradient method of every ODE block (default ``"checkpointed"``: ANODE).
        norm: normalisation in the ODE functions and transition blocks.
        t: integration interval of each ODE block.

    Shapes:
        ``(B, C_in, H, W)`` -> logits ``(B, K)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 num_stages: int = 4, ode_blocks_per_stage: int = 1, method: str = "euler",
                 steps: int = 2, rtol: float = 1e-3, atol: float = 1e-3, options: dict | None = None,
                 sensitivity="checkpointed", norm: str | None = "batch", t=(0.0, 1.0)):
        super().__init__()
        kw = _block_kwargs(method, steps, rtol, atol, sensitivity, options, t)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  _norm(norm, width), nn.ReLU())
        stages, c = [], width
        for i in range(num_stages):
            w = width * 2 ** i
            layers: list[nn.Module] = [BasicBlock(c, w, 1 if i == 0 else 2, norm)]
            layers += [ODEBlock(ResidualODEFunc(w, norm), **kw) for _ in range(ode_blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class ODESqueezeNext(ODEClassifierMixin, nn.Module):
    """ANODE's ODE-SqueezeNext (SqNxt-23 layout) for CIFAR: stem conv3x3-BN-ReLU (``64 * width_x``
    channels), four stages of ``(32, 64, 128, 256) * width_x`` channels (strides 1, 2, 2, 2), each one
    :class:`SqueezeNextBlock` followed by ``blocks[i] - 1`` ODE blocks of
    :class:`SqueezeNextODEFunc`, then conv1x1 (``128 * width_x``)-BN-ReLU, global average pooling and
    a linear head.

    Args:
        num_classes: classes ``K``.
        in_channels: image channels.
        width_x: width multiplier (1.0 is SqNxt-23-1x).
        blocks: blocks per stage, ordinary included (``(2, 2, 2, 2)``: one ODE block per stage).
        method, steps, rtol, atol, options, sensitivity, norm, t: as :class:`ODEResNet`.

    Shapes:
        ``(B, C_in, H, W)`` -> logits ``(B, K)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_x: float = 1.0,
                 blocks=(2, 2, 2, 2), method: str = "euler", steps: int = 2, rtol: float = 1e-3,
                 atol: float = 1e-3, options: dict | None = None, sensitivity="checkpointed",
                 norm: str | None = "batch", t=(0.0, 1.0)):
        super().__init__()
        kw = _block_kwargs(method, steps, rtol, atol, sensitivity, options, t)

        def ch(c):
            return max(1, int(width_x * c))

        c = ch(64)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, 1, 1), _norm(norm, c), nn.ReLU())
        stages = []
        for n_blocks, out, stride in zip(blocks, (32, 64, 128, 256), (1, 2, 2, 2)):
            o = ch(out)
            layers: list[nn.Module] = [SqueezeNextBlock(c, o, stride, norm)]
            layers += [ODEBlock(SqueezeNextODEFunc(o, norm), **kw) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c = o
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Conv2d(c, ch(128), 1), _norm(norm, ch(128)), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch(128), num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class IRDMClassifier(ODEClassifierMixin, nn.Module):
    """The IRDM classification net (sec. B.1): conv3x3 (``C_in -> width``), BatchNorm, ReLU, one
    :class:`~pyode_bridge.nn.ODEBlock` of :class:`~pyode_bridge.nn.ODEConvFunc` (two ``width``-channel
    weight-normalised 3x3 convolutions with ReLU), global average pooling and a linear head.

    Args:
        num_classes: classes ``K``.
        in_channels: image channels (3 for CIFAR, 1 for MNIST / digits).
        width: channels ``C`` of the ODE state (64 in the paper).
        method: solver (default ``"dopri5"``, as the paper); with a fixed-step method give ``steps``.
        rtol, atol: tolerances (default ``1e-3``, sec. 4.3).
        sensitivity: gradient method (default ``"interpolated"``: IRDM with 16 Chebyshev nodes).
        steps, options, t: as :class:`~pyode_bridge.nn.ODEBlock`.
        time_dependent, weight_norm: passed to :class:`~pyode_bridge.nn.ODEConvFunc`.

    Shapes:
        ``(B, C_in, H, W)`` -> logits ``(B, K)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-3,
                 sensitivity="interpolated", steps: int | None = None, options: dict | None = None,
                 t=(0.0, 1.0), time_dependent: bool = False, weight_norm: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.ode = ODEBlock(ODEConvFunc(width, time_dependent=time_dependent, weight_norm=weight_norm),
                            **_block_kwargs(method, steps, rtol, atol, sensitivity, options, t))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.ode(self.stem(x)))


MODELS = {"odenet": IRDMClassifier, "resnet": ODEResNet, "sqnxt": ODESqueezeNext}


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """A classifier by name.

    Args:
        name: ``"odenet"`` (:class:`IRDMClassifier`, the IRDM single-block net), ``"resnet"``
            (:class:`ODEResNet`) or ``"sqnxt"`` (:class:`ODESqueezeNext`).
        num_classes: classes ``K`` (10 / 100 for CIFAR-10 / 100).
        **kwargs: the model's constructor arguments (``width``, ``method``, ``steps``,
            ``sensitivity``, ...).

    Returns:
        The model, mapping ``(B, C_in, H, W)`` images to logits ``(B, K)``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)
