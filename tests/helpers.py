"""Small problems with known solutions and a finite-difference gradient, shared by the tests."""
import math

import torch


def flat_grad(outputs, inputs):
    g = torch.autograd.grad(outputs, inputs, allow_unused=True)
    return torch.cat([(x if x is not None else torch.zeros_like(i)).reshape(-1) for x, i in zip(g, inputs)])


def fd_grad(loss_fn, tensors, eps=1e-6):
    """Central finite differences of a scalar ``loss_fn()`` w.r.t. every entry of ``tensors``."""
    out = []
    with torch.no_grad():
        for x in tensors:
            flat = x.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = loss_fn().item()
                flat[i] = old - eps
                down = loss_fn().item()
                flat[i] = old
                out.append((up - down) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def mlp(act=torch.nn.Tanh, dim=2, hidden=16, seed=0, scale=1.0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), act(), torch.nn.Linear(hidden, dim)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


class ODEFunc(torch.nn.Module):
    """func(t, y) = net(y) as an nn.Module (so adjoint methods find the parameters)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


class Linear(torch.nn.Module):
    """dy/dt = A y with y(t) = expm(A t) y0."""

    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A.clone())

    def forward(self, t, y):
        return y @ self.A.T

    def exact(self, y0, t):
        return torch.stack([y0 @ torch.linalg.matrix_exp(self.A.detach() * (ti - t[0])).T for ti in t])


SPIRAL_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)


def cubic_spiral(t, y):
    """The cubic spiral y' = A y^3 of the torchdiffeq demo and IRDM's Figure 2."""
    return (y ** 3) @ SPIRAL_A.T.to(y.dtype)


def exp_sin(t):
    return math.exp(math.sin(t))


class SquashFunc(torch.nn.Module):
    """dz/dt = l2(t, tanh(l1(t, z))): a small time-dependent right-hand side (ConcatSquashLinear)."""

    def __init__(self, dim=4, hidden=8):
        super().__init__()
        from pyode_bridge.nn import ConcatSquashLinear

        self.l1 = ConcatSquashLinear(dim, hidden)
        self.l2 = ConcatSquashLinear(hidden, dim)

    def forward(self, t, z):
        return self.l2(t, torch.tanh(self.l1(t, z)))


def read_toml(path) -> dict:
    """A TOML file as a dict (tomllib, or tomli before Python 3.11; skips the test if neither)."""
    import pytest

    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli", reason="reading TOML needs tomllib or tomli")
    with open(path, "rb") as fh:
        return tomllib.load(fh)
