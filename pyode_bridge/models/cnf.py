"""Continuous normalizing flows (FFJORD, Grathwohl et al., ICLR 2019) on :func:`pyode_bridge.odeint`.

A CNF block integrates the state ``(z, logp)`` of

    dz/dt = f(t, z),        d(logp)/dt = -trace(df/dz)

from ``t = 0`` (data) to ``t = T`` (base). Stacking blocks and a standard normal base gives

    log p(x) = log N(z_K; 0, I) - sum_k delta_k,     delta_k = -integral_0^T trace(df_k/dz) dt.

The trace is computed exactly (one autograd pass per dimension, for small dimensions) or with
Hutchinson's estimator ``e^T (df/dz) e`` where the noise ``e`` (Rademacher or Gaussian) is drawn
*once per solve* and held fixed along the trajectory, which keeps the ODE deterministic for the
adaptive solver and the estimate of the log-density unbiased. The trace is built with
``create_graph=True`` whenever a graph is being recorded, so gradients flow through it with every
gradient method (``backprop``, ``checkpointed``, ``interpolated``, ``interpolating``,
``backsolve``): the adjoint methods call the dynamics under ``torch.enable_grad()`` and
differentiate the trace once more.

>>> import torch
>>> from pyode_bridge.models.cnf import CNF
>>> flow = CNF(2, hidden=(16, 16))
>>> flow.log_prob(torch.randn(5, 2)).shape
torch.Size([5])
"""
from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from ..nn import ConcatSquashLinear
from ..odeint import odeint
from ..stats import SolveStats

__all__ = ["CNF", "CNFBlock", "CNFDynamics", "ConcatSquashMLP", "divergence_exact", "divergence_hutchinson",
           "sample_noise", "standard_normal_log_prob"]

_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "silu": nn.SiLU,
                "swish": nn.SiLU, "sigmoid": nn.Sigmoid}


def _activation(activation) -> nn.Module:
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)} "
                             "or pass an nn.Module")
        return _ACTIVATIONS[activation]()
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    raise TypeError(f"activation must be a name, an nn.Module or an nn.Module class, got {activation!r}")


class ConcatSquashMLP(nn.Module):
    """FFJORD's time-dependent MLP ``f(t, z)`` of :class:`pyode_bridge.nn.ConcatSquashLinear` layers.

    Args:
        dim: state dimension ``D``.
        hidden: widths of the hidden layers (default ``(64, 64, 64)``).
        activation: ``"tanh"`` (default), ``"softplus"``, ``"elu"``, ``"silu"``/``"swish"``,
            ``"sigmoid"``, or an ``nn.Module`` (class); applied after every layer but the last.
            It must be twice differentiable for trace gradients to be meaningful (not ReLU).

    Shapes: ``t`` 0-d or ``(B,)`` (row ``b``'s time, per-sample mode), ``z`` ``(B, D)`` -> ``dz/dt``
    ``(B, D)``.
    """

    def __init__(self, dim: int, hidden=(64, 64, 64), activation="tanh"):
        super().__init__()
        widths = [dim, *hidden, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.acts = nn.ModuleList(_activation(activation) for _ in widths[1:-1])

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h


def divergence_exact(dz: torch.Tensor, z: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``trace(d dz / dz)`` per sample, one autograd pass per dimension (exact; cost O(D)).

    Rows must be independent (as for any per-sample network). Shapes: ``dz``, ``z`` ``(B, ...)``
    with ``dz`` computed from ``z`` -> ``(B,)``.
    """
    B = z.shape[0]
    flat_dz = dz.reshape(B, -1)
    div = dz.new_zeros(B)
    if not dz.requires_grad:
        return div
    for i in range(flat_dz.shape[1]):
        (g,) = torch.autograd.grad(flat_dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True,
                                   allow_unused=True)
        if g is not None:
            div = div + g.reshape(B, -1)[:, i]
    return div


def divergence_hutchinson(dz: torch.Tensor, z: torch.Tensor, e: torch.Tensor,
                          create_graph: bool = True) -> torch.Tensor:
    """Hutchinson's estimate ``e^T (d dz / dz) e`` per sample (one autograd pass).

    Unbiased for noise with ``E[e e^T] = I`` (Rademacher or standard Gaussian). Shapes: ``dz``,
    ``z``, ``e`` ``(B, ...)`` -> ``(B,)``.
    """
    B = z.shape[0]
    if not dz.requires_grad:
        return dz.new_zeros(B)
    (g,) = torch.autograd.grad(dz, z, e, create_graph=create_graph, retain_graph=True, allow_unused=True)
    if g is None:
        return dz.new_zeros(B)
    return (g * e).reshape(B, -1).sum(1)


def sample_noise(like: torch.Tensor, kind: str = "rademacher", generator: torch.Generator | None = None):
    """Noise for Hutchinson's estimator with ``like``'s shape, dtype and device.

    ``kind``: ``"rademacher"`` (entries +-1) or ``"gaussian"`` (standard normal).
    """
    gdev = generator.device if generator is not None else like.device
    if kind == "rademacher":
        e = torch.randint(0, 2, like.shape, generator=generator, device=gdev).to(like.dtype) * 2 - 1
    elif kind == "gaussian":
        e = torch.randn(like.shape, generator=generator, device=gdev, dtype=like.dtype)
    else:
        raise ValueError(f"unknown noise {kind!r}; use 'rademacher' or 'gaussian'")
    return e.to(like.device)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over all but the first dimension: ``(B, ...)`` -> ``(B,)``."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat.pow(2) + math.log(2 * math.pi)).sum(1)


class CNFDynamics(nn.Module):
    """The augmented right-hand side ``(t, (z, logp)) -> (f(t, z), -trace(df/dz))``.

    Args:
        net: ``net(t, z) -> dz/dt`` with ``z`` ``(B, ...)`` (e.g. :class:`ConcatSquashMLP`).
        divergence: ``"exact"`` or ``"hutchinson"`` (then ``forward`` needs the noise ``e``).

    ``forward(t, (z, logp), e=None)``: ``t`` 0-d or ``(B,)`` (row ``b``'s time: the trace of each
    row is its own, so per-row times need nothing more), ``z`` ``(B, ...)``, ``logp`` ``(B,)``, ``e`` like
    ``z`` -> ``(dz (B, ...), dlogp (B,))``. The trace is computed under ``torch.enable_grad()``
    and keeps its graph (``create_graph=True``) exactly when the caller records one; otherwise the
    outputs are detached.
    """

    def __init__(self, net: nn.Module, divergence: str = "exact"):
        super().__init__()
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        self.net, self.divergence = net, divergence

    def forward(self, t: torch.Tensor, state, e: torch.Tensor | None = None):
        z, logp = state
        need_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                # No graph to keep hold of: a fresh leaf to differentiate the trace against.
                z = z.detach().requires_grad_(True)
            dz = self.net(t.to(z.dtype), z)
            if self.divergence == "exact":
                div = divergence_exact(dz, z, create_graph=need_graph)
            else:
                if e is None:
                    raise ValueError("divergence='hutchinson' needs the noise e (drawn once per solve)")
                div = divergence_hutchinson(dz, z, e, create_graph=need_graph)
        dlogp = -div.reshape(logp.shape).to(logp.dtype)
        if not need_graph:
            return dz.detach(), dlogp.detach()
        return dz, dlogp


class _BoundDynamics:
    """The right-hand side of one solve: the dynamics with that solve's Hutchinson noise fixed, so
    the adjoint methods' backward pass sees the same ``e`` as the forward (even if another solve
    has drawn new noise in between)."""

    def __init__(self, dynamics: CNFDynamics, e: torch.Tensor | None):
        self.dynamics, self.e = dynamics, e

    def __call__(self, t, state):
        return self.dynamics(t, state, e=self.e)


class _ZOnly:
    """``(t, z) -> net(t, z)``: the flow without the log-density (for plain sampling)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, t, z):
        return self.net(t.to(z.dtype), z)


class CNFBlock(nn.Module):
    """One continuous normalizing flow step: solve ``(z, logp)`` over ``[0, T]`` (or back).

    Args:
        net: ``net(t, z) -> dz/dt``, an ``nn.Module`` (its parameters get gradients with every
            sensitivity method).
        T: integration time.
        divergence: ``"exact"`` or ``"hutchinson"``.
        noise: ``"rademacher"`` or ``"gaussian"`` (Hutchinson only).
        sensitivity, rtol, atol, method, options: passed to :func:`pyode_bridge.odeint`.
        odeint_kwargs: further keywords for ``odeint`` (``adjoint_rtol``, ``adjoint_atol``, ...).

    Attributes:
        stats: :class:`~pyode_bridge.SolveStats` of the last call (backward counters are filled
            once ``.backward()`` has run through it).
    """

    def __init__(self, net: nn.Module, T: float = 1.0, divergence: str = "exact", noise: str = "rademacher",
                 sensitivity="backprop", rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                 options: dict | None = None, odeint_kwargs: dict | None = None):
        super().__init__()
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T!r}")
        self.net = net
        self.dynamics = CNFDynamics(net, divergence)
        self.T, self.noise = float(T), noise
        self.sensitivity, self.rtol, self.atol, self.method = sensitivity, rtol, atol, method
        self.options = options
        self.odeint_kwargs = dict(odeint_kwargs or {})
        self.stats = SolveStats()

    @property
    def divergence(self) -> str:
        return self.dynamics.divergence

    @divergence.setter
    def divergence(self, value: str) -> None:
        if value not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {value!r}")
        self.dynamics.divergence = value

    def _times(self, z, reverse):
        t = torch.tensor([0.0, self.T], dtype=z.dtype, device=z.device)
        return t.flip(0) if reverse else t

    def _solve(self, func, y0, t):
        return odeint(func, y0, t, rtol=self.rtol, atol=self.atol, method=self.method,
                      options=self.options, sensitivity=self.sensitivity, stats=self.stats,
                      adjoint_params=tuple(self.net.parameters()), **self.odeint_kwargs)

    def forward(self, z: torch.Tensor, logp: torch.Tensor | None = None, reverse: bool = False,
                generator: torch.Generator | None = None):
        """Flow ``z`` from ``t=0`` to ``T`` (``reverse``: from ``T`` to ``0``).

        Shapes: ``z`` ``(B, ...)``, ``logp`` ``(B,)`` or ``None``. Returns ``(z_out (B, ...),
        logp_out (B,))`` with ``logp_out = logp - integral trace(df/dz) dt`` along the direction of
        integration, or ``(z_out, None)`` when ``logp`` is ``None`` (no trace is computed).
        ``generator`` draws the Hutchinson noise (once for this solve).
        """
        t = self._times(z, reverse)
        if logp is None:
            return self._solve(_ZOnly(self.net), z, t)[-1], None
        e = sample_noise(z, self.noise, generator) if self.divergence == "hutchinson" else None
        zs, logps = self._solve(_BoundDynamics(self.dynamics, e), (z, logp), t)
        return zs[-1], logps[-1]


class CNF(nn.Module):
    """A FFJORD continuous normalizing flow: stacked :class:`CNFBlock` s and a standard normal base.

    Data ``x`` sits at ``t = 0`` of the first block, the base variable ``z`` at ``t = T`` of the last.

    Args:
        dim: data dimension ``D`` (samples are ``(B, D)``).
        num_blocks: number of stacked blocks (ignored when ``nets`` is given).
        hidden: hidden widths of each block's :class:`ConcatSquashMLP` (default ``(64, 64, 64)``).
        T: integration time of each block.
        divergence: ``"exact"`` (default) or ``"hutchinson"``.
        noise: Hutchinson noise, ``"rademacher"`` (default) or ``"gaussian"``.
        activation: of the MLPs (``"tanh"`` default; see :class:`ConcatSquashMLP`).
        sensitivity: gradient method for every solve (a name or an instance such as
            ``pob.Interpolated(nodes=16)``).
        rtol, atol, method, options: solver settings (``dopri5``, ``1e-5``, ``1e-5`` by default).
        odeint_kwargs: further ``odeint`` keywords (``adjoint_rtol`` ...).
        nets: optional sequence of ``nn.Module`` s ``net(t, z) -> dz/dt`` used instead of the
            default MLPs (one block each).

    Attributes:
        blocks: ``nn.ModuleList`` of :class:`CNFBlock`.
        stats: (property) a :class:`~pyode_bridge.SolveStats` summing all blocks' last solves.
        block_stats: (property) the per-block stats of the last call.
    """

    def __init__(self, dim: int, num_blocks: int = 1, hidden=(64, 64, 64), T: float = 1.0,
                 divergence: str = "exact", noise: str = "rademacher", activation="tanh",
                 sensitivity="backprop", rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                 options: dict | None = None, odeint_kwargs: dict | None = None, nets=None):
        super().__init__()
        self.dim = int(dim)
        if nets is None:
            if num_blocks < 1:
                raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
            nets = [ConcatSquashMLP(dim, hidden, activation) for _ in range(num_blocks)]
        nets = list(nets)
        if not nets:
            raise ValueError("nets must contain at least one module")
        self.blocks = nn.ModuleList(
            CNFBlock(net, T=T, divergence=divergence, noise=noise, sensitivity=sensitivity, rtol=rtol,
                     atol=atol, method=method, options=options, odeint_kwargs=odeint_kwargs)
            for net in nets)

    def configure(self, **settings) -> CNF:
        """Change solver settings of every block in place, e.g. ``flow.configure(sensitivity=
        "interpolated", rtol=1e-6)``. Keys: ``sensitivity``, ``rtol``, ``atol``, ``method``,
        ``options``, ``odeint_kwargs``, ``divergence``, ``noise``, ``T``. Returns ``self``."""
        allowed = {"sensitivity", "rtol", "atol", "method", "options", "odeint_kwargs", "divergence",
                   "noise", "T"}
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; use some of {sorted(allowed)}")
        for block in self.blocks:
            for k, v in settings.items():
                setattr(block, k, float(v) if k == "T" else v)
        return self

    @property
    def block_stats(self) -> list:
        return [b.stats for b in self.blocks]

    @property
    def stats(self) -> SolveStats:
        total = SolveStats()
        for b in self.blocks:  # CNFBlocks (a ModuleList is typed as holding any Module)
            total.merge_from(cast(CNFBlock, b).stats)
        return total

    def _reference(self) -> torch.Tensor | None:
        for p in self.parameters():
            return p
        for b in self.buffers():
            return b
        return None

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Push data to the base: ``x`` ``(B, D)`` -> ``(z (B, D), delta_logp (B,))`` with
        ``log p(x) = log N(z; 0, I) - delta_logp`` (FFJORD's convention)."""
        z, delta = x, x.new_zeros(x.shape[0])
        for block in self.blocks:
            z, delta = block(z, delta, generator=generator)
        return z, delta

    def log_prob(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``log p(x)`` in nats: ``(B, D)`` -> ``(B,)`` (an unbiased estimate with Hutchinson)."""
        z, delta = self(x, generator=generator)
        return standard_normal_log_prob(z) - delta

    def bits_per_dim(self, x: torch.Tensor, data_scale: float = 1.0, reduction: str = "mean",
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension.

        ``data_scale``: the model sees ``x = raw / data_scale`` (e.g. 256 for pixels ``0..255``
        dequantised and divided by 256); ``log p(raw) = log p(x) - D log(data_scale)``.
        ``reduction``: ``"mean"`` (scalar) or ``"none"`` (``(B,)``).
        """
        D = x[0].numel()
        nll = -self.log_prob(x, generator=generator) + D * math.log(data_scale)
        bpd = nll / (D * math.log(2.0))
        if reduction == "mean":
            return bpd.mean()
        if reduction == "none":
            return bpd
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")

    def sample(self, n: int | None = None, z: torch.Tensor | None = None,
               generator: torch.Generator | None = None, return_log_prob: bool = False):
        """Draw samples by integrating base draws backwards (``t`` from ``T`` to ``0``, last block
        first).

        Args:
            n: number of samples (base draws from ``generator``), or
            z: given base points ``(B, D)``.
            generator: for the base draws and the Hutchinson noise.
            return_log_prob: also integrate the log-density along the way and return ``log p(x)``
                ``(B,)`` (starts from ``log N(z)``; costs the trace).

        Returns:
            ``x`` ``(B, D)``, or ``(x, log_prob)`` with ``return_log_prob``.
        """
        if z is None:
            if n is None:
                raise ValueError("pass n (number of samples) or z (base points)")
            ref = self._reference()
            dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
            device = ref.device if ref is not None else None
            gdev = generator.device if generator is not None else device
            z = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=gdev).to(device)
        logp = standard_normal_log_prob(z) if return_log_prob else None
        x = z
        for block in reversed(self.blocks):
            x, logp = block(x, logp, reverse=True, generator=generator)
        return (x, logp) if return_log_prob else x
