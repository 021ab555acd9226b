"""What the backward solve's error control costs on a batch-mean loss (issue 16, item 8):
torchdiffeq's ``examples/cnf.py`` model through ``odeint_adjoint``, against torchdiffeq itself and a
float64 tight-tolerance reference gradient."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err
from test_gradient_truth import Forced, forced_exact_grad
from torch import nn

import pyode_bridge as pob
import pyode_bridge.torchdiffeq as tdc

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64


class HyperCNF(nn.Module):
    """The example's CNF: ``dz/dt`` a width-``width`` tanh mixture whose weights a hyper-network
    makes from ``t``, ``dlogp/dt = -tr(df/dz)`` by autograd; state ``(z (B, 2), logp (B, 1))``."""

    def __init__(self, hidden=32, width=64):
        super().__init__()
        self.width, self.nfe = width, 0
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 7 * width))

    def forward(self, t, state):
        self.nfe += 1
        z, w = state[0], self.width
        with torch.enable_grad():
            z.requires_grad_(True)
            p = self.net(t.reshape(1, 1)).reshape(-1)
            W, U, G, B = p[:2 * w], p[2 * w:4 * w], p[4 * w:6 * w], p[6 * w:]
            h = torch.tanh(z.unsqueeze(0) @ W.reshape(w, 2, 1) + B.reshape(w, 1, 1))
            dz = (h @ (U * torch.sigmoid(G)).reshape(w, 1, 2)).mean(0)
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return dz, -trace.reshape(-1, 1)


def circles(n, generator):
    """sklearn's make_circles(noise=0.06, factor=0.5): two rings, radius 1 and 0.5."""
    angle = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    radius = torch.where(torch.arange(n) % 2 == 0, 1.0, 0.5).to(torch.float64)
    ring = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    return ring + 0.06 * torch.randn(n, 2, generator=generator, dtype=torch.float64)


def nll_gradient(solve, func, x):
    """(forward NFE, backward NFE, flat parameter gradient) of the example's loss: the mean
    negative log-likelihood of ``x`` under N(0, 0.1 I) after the flow from t = 10 to t = 0."""
    dtype = next(func.parameters()).dtype
    x = x.to(dtype)
    func.zero_grad(set_to_none=True)
    func.nfe = 0
    z, logp = solve(func, (x, torch.zeros(len(x), 1, dtype=dtype)), torch.tensor([10.0, 0.0], dtype=dtype))
    nfe_fwd = func.nfe
    log_prior = -z[-1].pow(2).sum(1) / 0.2 - math.log(2 * math.pi * 0.1)
    (-(log_prior - logp[-1].reshape(-1)).mean()).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in func.parameters()]).double()
    return nfe_fwd, func.nfe - nfe_fwd, grad


def test_cnf_example_adjoint_costs_no_more_than_torchdiffeq_at_no_worse_gradient():
    """The parameter integral's absolute tolerance is in units of the incoming gradient's L2 norm.
    In units of its largest entry (1/512 of a sample's gradient for this mean over 512 samples),
    the backward took 56 evaluations against torchdiffeq's 32 (total 94 against 82) for the same
    gradient error."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    func = HyperCNF()
    x = circles(512, gen)

    def adjoint(lib):
        return lambda f, y0, t: lib.odeint_adjoint(f, y0, t, rtol=1e-5, atol=1e-5, method="dopri5")

    fwd_td, bwd_td, g_td = nll_gradient(adjoint(torchdiffeq), func, x)
    fwd, bwd, g = nll_gradient(adjoint(tdc), func, x)
    exact = func.double()
    *_, g_ref = nll_gradient(lambda f, y0, t: pob.odeint(f, y0, t, rtol=1e-9, atol=1e-9,
                                                          sensitivity="checkpointed"), exact, x)
    err, err_td = float((g - g_ref).norm() / g_ref.norm()), float((g_td - g_ref).norm() / g_ref.norm())
    assert err <= err_td and err < 1e-3, (err, err_td)
    assert fwd + bwd <= fwd_td + bwd_td, (fwd, bwd, fwd_td, bwd_td)
    # The old unit took 56 against 32 (1.75x); one more step than torchdiffeq (7 evaluations with
    # the PI controller's target after issue 16 item 11: 39) is the controllers' difference.
    assert bwd <= 1.25 * bwd_td, (bwd, bwd_td)


def test_parameter_integral_stays_accurate_where_a_batch_cancels():
    """The other side of that unit: where the samples' contributions cancel, dL/dtheta is only
    sqrt(N) entries' worth, which the L2 norm still resolves. The forced problem (whose seminorm
    gradient has the wrong sign) on 512 samples under a random-weight mean: relative error 1.3e-6
    with the L2 norm (1.2e-6 with the largest entry); the L1 norm, the size of aligned
    contributions, gave 2.3e-5."""
    n = 512
    weights = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=F64)
    func = Forced(0.5, 1.0, 20.0)
    ys = pob.odeint(func, torch.zeros(n, dtype=F64), torch.tensor([0.0, 10.0], dtype=F64), rtol=1e-6,
                    atol=1e-6, sensitivity="interpolating")
    (weights * ys[-1]).mean().backward()
    g = torch.stack([func.k.grad, func.amp.grad, func.w.grad])
    assert rel_err(g, forced_exact_grad(0.5, 1.0, 20.0) * weights.mean()) < 1e-5
