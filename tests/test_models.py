"""pyode_bridge.models: ODE classifiers (shapes, statistics, ANODE's exact gradient) and a short
training run on scikit-learn's 8x8 digits with every gradient method."""
import warnings

import pytest
import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge.models import IRDMClassifier, ODEResNet, ODESqueezeNext, build_model
from pyode_bridge.nn import ConcatSquashLinear, ODEBlock, ODEConvFunc

SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve"]



@pytest.mark.parametrize("name, kwargs, n_blocks, num_classes", [
    ("odenet", dict(width=8), 1, 10),
    ("resnet", dict(width=4), 4, 100),
    ("resnet", dict(width=4, num_stages=3, ode_blocks_per_stage=2, method="rk4", steps=1), 6, 10),
    ("sqnxt", dict(width_x=0.125), 4, 10),
    ("sqnxt", dict(width_x=0.125, blocks=(2, 3, 1, 2), sensitivity="interpolated", method="rk4",
                   steps=1), 4, 100),
])
def test_classifier_output_shapes_and_stats(name, kwargs, n_blocks, num_classes):
    torch.manual_seed(0)
    net = build_model(name, num_classes=num_classes, **kwargs)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, num_classes)
    assert len(net.ode_blocks()) == n_blocks
    nfe = sum(b.nfe for b in net.ode_blocks())
    assert net.nfe == nfe > 0 and net.ode_stats().steps_forward > 0
    assert net.nfe_backward == 0
    out.sum().backward()
    if net.ode_blocks()[0].sensitivity != "backprop":
        assert net.nfe_backward > 0
    assert all(p.grad is not None for p in net.parameters())


def test_build_model_kinds_and_errors():
    assert isinstance(build_model("odenet"), IRDMClassifier)
    assert isinstance(build_model("resnet", width=4), ODEResNet)
    assert isinstance(build_model("sqnxt", width_x=0.25), ODESqueezeNext)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")


def test_irdm_classifier_matches_paper_layout():
    net = IRDMClassifier(num_classes=10)
    conv, bn, relu = net.stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 64, (3, 3))
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    assert isinstance(net.ode, ODEBlock) and isinstance(net.ode.func, ODEConvFunc)
    assert (net.ode.func.conv1.in_channels, net.ode.func.conv2.out_channels) == (64, 64)
    assert net.ode.method == "dopri5" and net.ode.rtol == net.ode.atol == 1e-3
    assert net.ode.sensitivity == "interpolated"
    assert net.head[-1].in_features == 64


def test_ode_resnet_layout_and_fixed_steps():
    net = ODEResNet(width=4, method="midpoint", steps=3)
    widths = [s[0].conv2.out_channels for s in net.stages]
    assert widths == [4, 8, 16, 32]
    strides = [s[0].conv1.stride[0] for s in net.stages]
    assert strides == [1, 2, 2, 2]
    net(torch.randn(2, 3, 32, 32))
    for b in net.ode_blocks():
        assert b.stats.steps_forward == 3 and b.nfe == 6  # midpoint: 2 evaluations per step


def test_ode_resnet_checkpointed_equals_backprop():
    """ANODE: the checkpointed gradient is the exact gradient of the discrete forward map."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for sens in ("backprop", "checkpointed"):
        torch.manual_seed(0)
        net = ODEResNet(width=4, num_stages=2, method="rk4", steps=2, sensitivity=sens).double()
        net(x).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-11)


# --- training on the 8x8 digits -------------------------------------------------------------------


class _DigitsFunc(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.l1 = ConcatSquashLinear(width, width)
        self.l2 = ConcatSquashLinear(width, width)

    def forward(self, t, z):
        return self.l2(t, torch.tanh(self.l1(t, z)))


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return X[perm[:1200]], y[perm[:1200]], X[perm[1200:]], y[perm[1200:]]


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_digits_classification_trains_with_every_method(digits, sensitivity):
    """Linear -> ODE block (rk4, 2 steps) -> linear head, 3 epochs of Adam: > 85% held-out accuracy
    (chance is 10%) with every gradient method, and the ODE parameters actually move."""
    Xtr, ytr, Xte, yte = digits
    torch.manual_seed(0)
    width = 32
    strat = pob.Interpolated(nodes=4) if sensitivity == "interpolated" else sensitivity
    block = ODEBlock(_DigitsFunc(width), method="rk4", steps=2, sensitivity=strat)
    net = nn.Sequential(nn.Linear(64, width), nn.Tanh(), block, nn.Linear(width, 10))
    before = [p.detach().clone() for p in block.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. backsolve's instability guard must stay quiet
        for _ in range(3):
            idx = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(idx), 100):
                b = idx[i:i + 100]
                loss = nn.functional.cross_entropy(net(Xtr[b]), ytr[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    if sensitivity != "backprop":
        assert block.nfe_backward > 0
    with torch.no_grad():
        acc = (net(Xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.85, f"{sensitivity}: held-out accuracy {acc:.3f}"
    moved = max((p - q).abs().max().item() for p, q in zip(block.parameters(), before))
    assert moved > 1e-3
