"""The benchmark workloads shared by the scripts in this folder (same problem for every library)."""
from __future__ import annotations

import time

import torch
from torch import nn


class Counting(nn.Module):
    """Wraps an ODE function ``net(y)`` as ``func(t, y)`` and counts its calls."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, t, y, args=None):  # ``args``: torchdyn passes it as a keyword
        self.calls += 1
        return self.net(y)


def mlp_workload(device="cpu", dtype=torch.float32, seed=0):
    """(a) 2 -> 64 -> 64 -> 2 tanh MLP on a batch of 100, dopri5 at rtol = atol = 1e-5."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    y0 = torch.randn(100, 2)
    return "mlp 2-64-64-2 tanh, batch 100, tol 1e-5", Counting(net).to(device, dtype), y0.to(device, dtype), 1e-5


def conv_workload(device="cpu", dtype=torch.float32, seed=0, batch=32, channels=64, size=16):
    """(b) a 64-channel 3x3 conv pair with ReLU on 32x64x16x16, dopri5 at rtol = atol = 1e-3."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(channels, channels, 3, padding=1))
    y0 = torch.randn(batch, channels, size, size)
    name = f"conv pair {channels}ch ReLU, batch {batch}x{channels}x{size}x{size}, tol 1e-3"
    return name, Counting(net).to(device, dtype), y0.to(device, dtype), 1e-3


WORKLOADS = {"mlp": mlp_workload, "conv": conv_workload}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def flat_grads(func, y0):
    grads = [y0.grad] + [p.grad for p in func.parameters()]
    return torch.cat([g.reshape(-1) for g in grads if g is not None])
