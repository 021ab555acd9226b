"""Every solver and gradient method on CUDA: same numbers as on the CPU, everything the backward
keeps stays on the device, and the forward syncs with the host only for step acceptance.
Skipped (with the reason) where torch sees no CUDA device."""
import warnings

import pytest
import torch
from helpers import ODEFunc, flat_grad, mlp, rel_err

import pyode_bridge as pob

pytestmark = pytest.mark.cuda

METHODS = ["dopri5", "tsit5", "bosh3", "adaptive_heun", "rk4", "euler", "midpoint"]
SENS = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve",
        pob.Interpolated(nodes="auto"), pob.Interpolating(checkpointing=True)]


def _run(device, method, sens):
    func = ODEFunc(mlp(torch.nn.Tanh, hidden=16, seed=7)).to(device)
    y0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    y0.requires_grad_(True)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64, device=device)
    opts = {"step_size": 0.05} if method in ("rk4", "euler", "midpoint") else None
    ys = pob.odeint(func, y0, t, rtol=1e-8, atol=1e-8, method=method, options=opts, sensitivity=sens)
    assert ys.device.type == device
    g = flat_grad((ys ** 2).sum(), [y0] + list(func.parameters()))
    return ys.detach().cpu(), g.cpu()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", SENS, ids=str)
def test_cuda_matches_cpu(method, sens):
    ys_cpu, g_cpu = _run("cpu", method, sens)
    ys_gpu, g_gpu = _run("cuda", method, sens)
    torch.testing.assert_close(ys_gpu, ys_cpu, rtol=1e-9, atol=1e-9)
    assert rel_err(g_gpu, g_cpu) < 1e-7


@pytest.mark.parametrize("sens", ["checkpointed", "interpolated", "interpolating"])
def test_saved_data_stays_on_device(sens):
    func = ODEFunc(mlp(torch.nn.Tanh, hidden=16)).cuda()
    y0 = torch.randn(6, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    ys = pob.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64, device="cuda"), sensitivity=sens)
    node = ys.grad_fn
    found = []

    def walk(obj, depth=0):
        if depth > 6:
            return
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(node.saved)
    assert found and all(x.device.type == "cuda" for x in found)


def test_forward_syncs_once_per_step():
    func = ODEFunc(mlp(torch.nn.Tanh, hidden=16)).cuda().float()
    y0 = torch.randn(64, 2, device="cuda")
    t = torch.linspace(0.0, 2.0, 20, device="cuda")
    stats = pob.SolveStats()
    pob.odeint(func, y0, t, rtol=1e-6, atol=1e-6, stats=stats)  # warm-up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            pob.odeint(func, y0, t, rtol=1e-6, atol=1e-6, stats=stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in rec if "synchroniz" in str(w.message).lower()]
    steps = stats.steps_forward + stats.steps_rejected
    # one per attempted step (error ratio) + input validation and the initial-step heuristic
    assert len(syncs) <= steps + 8, (len(syncs), steps)
