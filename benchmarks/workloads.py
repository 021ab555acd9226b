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


class _CountingCNF(nn.Module):
    """FFJORD's 2-D toy dynamics (exact trace) on the state ``(z, logp)``, counting calls."""

    def __init__(self, dynamics):
        super().__init__()
        self.dynamics = dynamics
        self.calls = 0

    def forward(self, t, state, args=None):
        self.calls += 1
        return self.dynamics(t, state)


def cnf_workload(device="cpu", dtype=torch.float32, seed=0):
    """(c) FFJORD toy CNF: concatsquash 2-64-64-64-2 tanh, exact trace, batch 100, tol 1e-5;
    the state is ``(z, logp)`` (peers.md's CNF-2D baseline)."""
    from pyode_bridge.models.cnf import CNFDynamics, ConcatSquashMLP

    torch.manual_seed(seed)
    func = _CountingCNF(CNFDynamics(ConcatSquashMLP(2, (64, 64, 64)), divergence="exact"))
    y0 = (torch.randn(100, 2), torch.zeros(100, 1))
    return ("FFJORD CNF 2-D, concatsquash 64-64-64, exact trace, batch 100, tol 1e-5",
            func.to(device, dtype), tuple(p.to(device, dtype) for p in y0), 1e-5)


WORKLOADS = {"mlp": mlp_workload, "conv": conv_workload, "cnf": cnf_workload}


def clone_state(y0, requires_grad):
    """A fresh leaf copy of a tensor or tuple state."""
    if isinstance(y0, tuple):
        return tuple(p.clone().requires_grad_(requires_grad) for p in y0)
    return y0.clone().requires_grad_(requires_grad)


def first(y0):
    """The first tensor of a state (for its device and dtype)."""
    return y0[0] if isinstance(y0, tuple) else y0


def last(ys):
    """The final time of an ``odeint`` result (tensor or tuple)."""
    return tuple(y[-1] for y in ys) if isinstance(ys, tuple) else ys[-1]


def loss_of(out):
    """The benchmark loss: mean of squares over every part of the final state."""
    parts = out if isinstance(out, tuple) else (out,)
    return sum(p.square().mean() for p in parts)


def state_grads(y):
    """Flat gradient of a tensor or tuple leaf state."""
    parts = y if isinstance(y, tuple) else (y,)
    return [p.grad.reshape(-1) for p in parts]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# The timer of timed(): wall time by default; time.process_time (CPU time of this process) is
# robust to other jobs on a shared CPU machine (not meaningful for CUDA, where the GPU's time is
# not the process's).
CLOCK = time.perf_counter


def timed(fn, device):
    sync(device)
    start = CLOCK()
    out = fn()
    sync(device)
    return CLOCK() - start, out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


