"""pyode_bridge.nn: the ODEBlock layer and the time-dependent layers."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from helpers import SquashFunc
from torch import nn

import pyode_bridge as pob
from pyode_bridge.nn import ConcatConv2d, ConcatSquashLinear, ODEBlock, ODEConvFunc, collect_stats

SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve"]


def _net(sensitivity="backprop", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw.setdefault("method", "rk4")
    kw.setdefault("steps", 4)
    return nn.Sequential(nn.Linear(3, 4), ODEBlock(SquashFunc(), sensitivity=sensitivity, **kw),
                         nn.Linear(4, 2)).to(dtype)


# --- layers -------------------------------------------------------------------------------------


def test_concat_squash_linear_matches_hand_computation():
    torch.manual_seed(1)
    layer = ConcatSquashLinear(3, 5).double()
    x, t = torch.randn(7, 3, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    W, b1 = layer._layer.weight, layer._layer.bias
    c, b2 = layer._hyper_gate.weight[:, 0], layer._hyper_gate.bias
    b3 = layer._hyper_bias.weight[:, 0]
    assert layer._hyper_bias.bias is None
    expected = (x @ W.T + b1) * torch.sigmoid(t * c + b2) + t * b3
    torch.testing.assert_close(layer(t, x), expected, rtol=1e-14, atol=1e-14)
    # Any leading batch shape broadcasts; float32 time with a float64 state is cast, not promoted.
    assert layer(t.float(), torch.randn(2, 4, 3, dtype=torch.float64)).shape == (2, 4, 5)
    assert layer(t.float(), x).dtype == torch.float64


def test_concat_conv2d_sees_time_as_a_channel():
    torch.manual_seed(2)
    layer = ConcatConv2d(3, 4, ksize=3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    t = torch.tensor(0.8, dtype=torch.float64)
    expected = layer._layer(torch.cat([torch.full((2, 1, 5, 5), 0.8, dtype=torch.float64), x], 1))
    torch.testing.assert_close(layer(t, x), expected)
    assert layer._layer.in_channels == 4
    assert not torch.allclose(layer(t, x), layer(torch.tensor(0.1, dtype=torch.float64), x))


@pytest.mark.parametrize("time_dependent", [False, True])
def test_ode_conv_func_shapes_and_weight_norm(time_dependent):
    f = ODEConvFunc(channels=16, time_dependent=time_dependent)
    x = torch.randn(2, 16, 6, 6)
    assert f(torch.tensor(0.0), x).shape == (2, 16, 6, 6)
    convs = (f.conv1._layer, f.conv2._layer) if time_dependent else (f.conv1, f.conv2)
    for conv in convs:
        assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
        g = conv.parametrizations.weight.original0
        v = conv.parametrizations.weight.original1
        assert g.shape == (16, 1, 1, 1) and v.shape == conv.weight.shape
        # weight = g * v / ||v|| per output channel
        norm = v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(conv.weight, g * v / norm)
        with torch.no_grad():
            g.mul_(2.0)
        torch.testing.assert_close(conv.weight, g * v / norm)
    assert convs[0].in_channels == 16 + int(time_dependent)
    # The paper's default: 64 -> 64 channels; a custom hidden width is honoured.
    assert ODEConvFunc().conv1.out_channels == 64
    assert ODEConvFunc(8, hidden=12).conv1.out_channels == 12
    assert not any(torch.nn.utils.parametrize.is_parametrized(m)
                   for m in ODEConvFunc(8, weight_norm=False).modules())
    # Time-dependence: only the time-dependent variant reacts to t.
    same = torch.allclose(f(torch.tensor(0.0), x), f(torch.tensor(0.7), x))
    assert same is (not time_dependent)


# --- ODEBlock -----------------------------------------------------------------------------------


def test_odeblock_matches_odeint_and_registers_func():
    func = SquashFunc().double()
    block = ODEBlock(func, t=(0.0, 0.5, 1.0), rtol=1e-6, atol=1e-8)
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = pob.odeint(func, x, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(block(x), ref[-1])
    assert block.func is func and "func" in dict(block.named_children())
    assert {n for n, _ in block.named_parameters()} == {"func." + n for n, _ in func.named_parameters()}
    assert "t_span" in block.state_dict()
    assert block.nfe == block.stats.nfe_forward > 0
    traj = ODEBlock(func, t=(0.0, 0.5, 1.0), rtol=1e-6, atol=1e-8, return_trajectory=True)(x)
    assert traj.shape == (3, 5, 4)
    with pytest.raises(ValueError, match="two times"):
        ODEBlock(func, t=(0.0,))


def test_odeblock_plain_callable_and_tuple_state():
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)

    def func(t, state):
        z, logp = state
        return z @ A.T, -torch.ones_like(logp)

    block = ODEBlock(func, t=(0.0, 2.0), rtol=1e-8, atol=1e-10)
    z0 = torch.randn(3, 2, dtype=torch.float64)
    z1, logp1 = block((z0, torch.zeros(3, 1, dtype=torch.float64)))
    torch.testing.assert_close(z1, z0 @ torch.linalg.matrix_exp(2.0 * A).T, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp1, torch.full((3, 1), -2.0, dtype=torch.float64))
    assert list(block.children()) == []


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_odeblock_in_sequential_gradients_agree(sensitivity):
    """Every method trains the whole Sequential; discrete-exact ones equal backprop's gradient."""
    x = torch.randn(6, 3, dtype=torch.float64)
    grads = {}
    for sens in ("backprop", sensitivity):
        net = _net(sens)
        net(x).pow(2).sum().backward()
        grads[sens] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        block = net[1]
        # rk4, 4 steps; the dense-output readers may evaluate the last step's end derivative.
        assert block.stats.steps_forward == 4 and block.stats.nfe_forward in (16, 17)
        if sens != "backprop":
            assert block.nfe_backward > 0
    tol = 1e-10 if sensitivity in ("backprop", "checkpointed") else 1e-3
    torch.testing.assert_close(grads[sensitivity], grads["backprop"], rtol=tol, atol=tol)


def test_odeblock_train_eval_and_no_grad():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        ODEBlock(ODEConvFunc(4), sensitivity="interpolated"),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(5, 1, 6, 6)
    net.train()
    out_train = net(x)
    out_train.sum().backward()
    assert net[3].stats.nfe_backward > 0
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    torch.testing.assert_close(a, b)  # eval mode is deterministic (BN running stats)
    assert not torch.allclose(a, out_train.detach())  # ... and differs from batch statistics
    assert not net[3].training and net[3].func.training is False
    assert net[3].nfe > 0 and net[3].nfe_backward == 0  # no backward for the no_grad call


def test_odeblock_state_dict_round_trip():
    x = torch.randn(4, 3, dtype=torch.float64)
    net = _net("interpolated", method="dopri5", steps=None, t=(0.0, 0.7))
    path = os.path.join(tempfile.mkdtemp(), "net.pt")
    torch.save(net.state_dict(), path)
    other = nn.Sequential(nn.Linear(3, 4), ODEBlock(SquashFunc(), sensitivity="interpolated"),
                          nn.Linear(4, 2)).double()
    torch.manual_seed(123)
    for p in other.parameters():
        p.data.normal_()
    assert not torch.equal(other(x), net(x))
    other.load_state_dict(torch.load(path))
    torch.testing.assert_close(other[1].t_span, torch.tensor([0.0, 0.7], dtype=torch.float64))
    assert torch.equal(other(x), net(x))


def test_odeblock_double_and_to():
    net = _net(dtype=torch.float32, method="dopri5", steps=None)
    x = torch.randn(4, 3)
    y32 = net(x)
    net.double()
    assert net[1].t_span.dtype == torch.float64
    y64 = net(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-3, atol=1e-3)
    net.to("cpu")
    assert net[1].t_span.device.type == "cpu"


@pytest.mark.cuda
def test_odeblock_to_cuda():
    net = _net(dtype=torch.float32, sensitivity="interpolated").to("cuda")
    assert net[1].t_span.is_cuda
    out = net(torch.randn(4, 3, device="cuda"))
    out.sum().backward()
    assert out.is_cuda and net[1].func.l1._layer.weight.grad.is_cuda


def test_collect_stats_sums_blocks():
    net = nn.Sequential(ODEBlock(SquashFunc(), method="rk4", steps=2),
                        ODEBlock(SquashFunc(), method="rk4", steps=3, sensitivity="checkpointed"))
    net(torch.randn(2, 4)).sum().backward()
    s = collect_stats(net)
    assert s.nfe_forward == 8 + 12 and s.steps_forward == 5
    assert s.nfe_backward == 12  # checkpointed recomputes its 3 steps (4 evaluations each)


# --- DistributedDataParallel (gloo, two CPU processes) ------------------------------------------

DDP_SENSITIVITIES = ("backprop", "interpolated")


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(7)
        x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        part = slice(rank * 4, rank * 4 + 4)
        grads = {}
        for sens in DDP_SENSITIVITIES:
            model = DDP(_net(sens))
            loss = (model(x[part]) - y[part]).pow(2).mean()
            loss.backward()
            grads[sens] = [p.grad.clone() for p in model.module.parameters()]
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        del model  # see tests/test_ddp_training.py: no teardown while the other rank still talks
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_ddp_training.py: gloo's threads can abort the finalisation


def test_odeblock_ddp_gloo_matches_single_process():
    """Fixed-step solves: the per-rank solve is the same discrete map as the global-batch solve
    (adaptive steps would depend on each rank's error norm), so averaged gradients agree."""
    tmp = tempfile.mkdtemp()
    mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
    torch.manual_seed(7)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    for sens in DDP_SENSITIVITIES:
        net = _net(sens)
        (net(x) - y).pow(2).mean().backward()
        for p, g0, g1 in zip(net.parameters(), r0[sens], r1[sens]):
            torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # DDP all-reduced them
            torch.testing.assert_close(g0, p.grad, rtol=1e-10, atol=1e-12)
