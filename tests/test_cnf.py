"""pyode_bridge.models.cnf: FFJORD continuous normalizing flows."""
import math

import pytest
import torch

import pyode_bridge as pob
from pyode_bridge.models import cnf as cnf_mod
from pyode_bridge.models.cnf import (
    CNF,
    CNFDynamics,
    ConcatSquashMLP,
    divergence_exact,
    divergence_hutchinson,
    sample_noise,
    standard_normal_log_prob,
)

SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve"]


class LinearField(torch.nn.Module):
    """dz/dt = A z with a fixed matrix (a buffer: no parameters)."""

    def __init__(self, A):
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, t, z):
        return z @ self.A.T


def _gaussian_log_prob(x, cov):
    """log N(x; 0, cov) for rows of x."""
    D = cov.shape[0]
    sol = torch.linalg.solve(cov, x.T).T
    return -0.5 * ((x * sol).sum(1) + D * math.log(2 * math.pi) + torch.logdet(cov))


def _flow(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("hidden", (16, 16))
    return CNF(2, **kw).double()


def test_linear_flow_log_prob_is_the_pushforward_gaussian():
    """With dz/dt = A_k z the flow is x -> expm(A_2 T) expm(A_1 T) x, so the model density of x is
    the Gaussian N(0, P P^T) with P = (expm(A_2 T) expm(A_1 T))^{-1}, and each block's log-det
    is T trace(A_k)."""
    g = torch.Generator().manual_seed(0)
    A1 = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.6
    A2 = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.6
    T = 0.7
    flow = CNF(3, T=T, nets=[LinearField(A1), LinearField(A2)], rtol=1e-10, atol=1e-10)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) * 1.5
    z, delta = flow(x)
    M = torch.linalg.matrix_exp(A2 * T) @ torch.linalg.matrix_exp(A1 * T)
    torch.testing.assert_close(z, x @ M.T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(delta, torch.full((50,), -T * float(torch.trace(A1) + torch.trace(A2)),
                                                 dtype=torch.float64), rtol=1e-8, atol=1e-8)
    P = torch.linalg.inv(M)
    expected = _gaussian_log_prob(x, P @ P.T)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-8, atol=1e-8)
    # Hutchinson's estimate of a linear field: unbiased, and exact for noise e with e e^T = I on
    # the diagonal when A is diagonal.
    D = torch.diag(torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64))
    diag = CNF(3, T=T, nets=[LinearField(D)], divergence="hutchinson", rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diag.log_prob(x), _gaussian_log_prob(
        x, torch.linalg.matrix_exp(-2 * D * T)), rtol=1e-8, atol=1e-8)


def _jacobian(net, t, z1):
    return torch.autograd.functional.jacobian(lambda v: net(t, v.unsqueeze(0)).squeeze(0), z1)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_estimator_unbiased(noise):
    """Many draws of e^T J e at one point: the mean is the exact trace within a few standard
    errors, and the spread is the theoretical one (Rademacher: sum_{i != j} (J_ij + J_ji)^2 / 2;
    Gaussian: |J + J^T|_F^2 / 2)."""
    torch.manual_seed(1)
    net = ConcatSquashMLP(3, (32, 32), "softplus").double()
    t = torch.tensor(0.3, dtype=torch.float64)
    z1 = torch.randn(3, dtype=torch.float64)
    N = 20000
    z = z1.expand(N, 3).clone().requires_grad_(True)
    dz = net(t, z)
    exact = divergence_exact(dz, z, create_graph=False)
    J = _jacobian(net, t, z1)
    torch.testing.assert_close(exact, torch.full((N,), float(torch.trace(J)), dtype=torch.float64))
    e = sample_noise(z, noise, torch.Generator().manual_seed(2))
    if noise == "rademacher":
        assert set(e.unique().tolist()) == {-1.0, 1.0}
    est = divergence_hutchinson(dz, z, e, create_graph=False)
    S = J + J.T
    var = 0.5 * S.pow(2).sum()
    if noise == "rademacher":
        var = var - 0.5 * S.diagonal().pow(2).sum()
    se = math.sqrt(float(var) / N)
    assert abs(est.mean().item() - exact[0].item()) < 4 * se
    assert abs(est.var().item() / float(var) - 1) < 0.1


def test_hutchinson_flow_unbiased_and_noise_once_per_solve(monkeypatch):
    """The log-likelihood with Hutchinson's estimator averages to the exact one (noise per row,
    fixed along each trajectory); the noise is drawn once per block solve, not per RHS call."""
    flow = _flow(seed=3, divergence="hutchinson", noise="gaussian", num_blocks=2, rtol=1e-6, atol=1e-6)
    exact_flow = _flow(seed=3, divergence="exact", num_blocks=2, rtol=1e-6, atol=1e-6)
    x1 = torch.tensor([[0.4, -0.8]], dtype=torch.float64)
    exact = exact_flow.log_prob(x1)[0].item()
    calls = []
    real = cnf_mod.sample_noise
    monkeypatch.setattr(cnf_mod, "sample_noise", lambda *a, **k: calls.append(1) or real(*a, **k))
    N = 1000
    with torch.no_grad():
        est = flow.log_prob(x1.expand(N, 2), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 and flow.stats.nfe_forward > 10
    se = est.std().item() / math.sqrt(N)
    assert est.std().item() > 1e-3                          # the estimate really is random
    assert abs(est.mean().item() - exact) < 4 * se + 1e-4
    # Same generator state, same estimate.
    again = flow.log_prob(x1.expand(N, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.detach(), est)


def test_sample_then_log_prob_roundtrip():
    """sample() integrates backwards; pushing the samples forward returns the base points, and the
    log-density carried along the backward solve equals log_prob of the samples."""
    flow = _flow(seed=4, num_blocks=2, rtol=1e-8, atol=1e-8)
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(1.5)                                   # a clearly non-trivial map
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        x, logp = flow.sample(z=z, return_log_prob=True)
        assert (x - z).norm() > 0.3 * z.norm()
        z_back, delta = flow(x)
        torch.testing.assert_close(z_back, z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logp, flow.log_prob(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logp, standard_normal_log_prob(z) - delta, rtol=1e-6, atol=1e-6)
        # Plain sampling (no trace) gives the same points.
        torch.testing.assert_close(flow.sample(z=z), x, rtol=1e-7, atol=1e-7)
        s1 = flow.sample(10, generator=torch.Generator().manual_seed(9))
        s2 = flow.sample(10, generator=torch.Generator().manual_seed(9))
    assert s1.shape == (10, 2) and s1.dtype == torch.float64 and torch.equal(s1, s2)


def _param_grads(flow, x, sensitivity, generator_seed=None):
    flow.configure(sensitivity=sensitivity)
    flow.zero_grad()
    x = x.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    loss = -flow.log_prob(x, generator=gen).mean()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in flow.parameters()] + [x.grad.reshape(-1)]), loss.detach()


@pytest.mark.parametrize("sensitivity", SENSITIVITIES[1:])
def test_gradients_agree_with_backprop(sensitivity):
    """float64, tight tolerances: every gradient method gives backprop's gradient of the NLL
    (parameters and data), through the exact trace."""
    flow = _flow(seed=6, num_blocks=2, rtol=1e-10, atol=1e-10)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g_ref, loss_ref = _param_grads(flow, x, "backprop")
    g, loss = _param_grads(flow, x, sensitivity)
    assert torch.isfinite(g).all() and g_ref.norm() > 1e-3
    torch.testing.assert_close(loss, loss_ref)
    rel = ((g - g_ref).norm() / g_ref.norm()).item()
    # checkpointed recomputes backprop's discrete gradient; the others solve the continuous adjoint.
    assert rel < (1e-12 if sensitivity == "checkpointed" else 1e-6), rel
    st = flow.stats
    assert st.nfe_forward == sum(b.nfe_forward for b in flow.block_stats) > 0
    assert st.nfe_backward > 0


def test_gradients_hutchinson_same_noise_in_backward():
    """With Hutchinson's estimator the adjoint methods' backward pass re-evaluates the dynamics with
    the noise of the forward solve (bound to that solve): their gradient equals backprop's."""
    flow = _flow(seed=8, divergence="hutchinson", noise="rademacher", rtol=1e-10, atol=1e-10)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    g_ref, _ = _param_grads(flow, x, "backprop", generator_seed=1)
    for sens in ("interpolated", pob.Backsolve()):
        g, _ = _param_grads(flow, x, sens, generator_seed=1)
        assert ((g - g_ref).norm() / g_ref.norm()).item() < 1e-6
    g_other, _ = _param_grads(flow, x, "interpolated", generator_seed=2)
    assert ((g_other - g_ref).norm() / g_ref.norm()).item() > 1e-4          # other noise, other estimate


def test_gradient_matches_finite_differences():
    """backprop's gradient of log p(x) w.r.t. one weight matches central finite differences."""
    flow = _flow(seed=10, rtol=1e-11, atol=1e-11)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    w = flow.blocks[0].net.layers[1]._layer.weight
    flow.log_prob(x).sum().backward()
    eps = 1e-5
    for idx in [(0, 0), (3, 7)]:
        with torch.no_grad():
            old = w[idx].item()
            w[idx] = old + eps
            up = flow.log_prob(x).sum().item()
            w[idx] = old - eps
            down = flow.log_prob(x).sum().item()
            w[idx] = old
        assert abs(w.grad[idx].item() - (up - down) / (2 * eps)) < 1e-6 * max(1.0, abs(w.grad[idx].item()))


def test_dynamics_no_graph_and_shapes():
    flow = _flow(seed=12)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        lp = flow.log_prob(x)
    assert lp.shape == (5,) and not lp.requires_grad
    dyn = CNFDynamics(ConcatSquashMLP(2, (8,)).double())
    t = torch.tensor(0.0, dtype=torch.float64)
    with torch.no_grad():
        dz, dlogp = dyn(t, (x, torch.zeros(5, dtype=torch.float64)))
    assert dz.shape == (5, 2) and dlogp.shape == (5,) and not dz.requires_grad
    hutch = CNFDynamics(ConcatSquashMLP(2, (8,)).double(), "hutchinson")
    with pytest.raises(ValueError, match="noise"):
        hutch(t, (x, torch.zeros(5, dtype=torch.float64)))
    with pytest.raises(ValueError):
        CNFDynamics(ConcatSquashMLP(2, (8,)), "trace")
    with pytest.raises(ValueError):
        CNF(2, noise="uniform")
    with pytest.raises(ValueError):
        flow.configure(tolerance=1e-3)
    with pytest.raises(ValueError):
        ConcatSquashMLP(2, (8,), activation="nope")


def test_bits_per_dim_and_float32_default():
    flow = CNF(2, hidden=(8, 8))                             # float32 parameters by default
    x = torch.randn(7, 2)
    lp = flow.log_prob(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    bpd = flow.bits_per_dim(x)
    torch.testing.assert_close(bpd, (-lp / (2 * math.log(2))).mean(), rtol=1e-5, atol=1e-5)
    per = flow.bits_per_dim(x, data_scale=256.0, reduction="none")
    torch.testing.assert_close(per, -lp / (2 * math.log(2)) + 8.0, rtol=1e-5, atol=1e-5)
    assert flow.sample(3).dtype == torch.float32
    lp.mean().backward()
    assert all(p.grad is not None for p in flow.parameters())
