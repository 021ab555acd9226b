"""pyode_bridge.memory: predicted backward memory per gradient method against what autograd
and the adjoint contexts actually keep."""
import pytest
import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge.memory import measure_saved_bytes, memory_report, predict_backward_bytes, probe_func
from pyode_bridge.models import IRDMClassifier
from pyode_bridge.nn import ODEBlock, ODEConvFunc

B, C, H = 8, 16, 8
STEPS = 16
S_BYTES = B * C * H * H * 4



@pytest.fixture(scope="module")
def func_and_state():
    torch.manual_seed(0)
    return ODEConvFunc(C), torch.randn(B, C, H, H)


def test_probe_counts_what_one_evaluation_saves(func_and_state):
    """relu(x) and relu(conv1(.)) outputs (shared with the conv inputs) and the two weight-normed
    weights recomputed at each call: 2 states + 2 weights + per-channel norms."""
    func, x = func_and_state
    g, rows = probe_func(func, x)
    weight = C * C * 9 * 4
    assert 2 * S_BYTES + 2 * weight <= g <= 2 * S_BYTES + 2 * weight + 4 * C * 4
    assert [r.name for r in rows] == ["act", "conv1", "act#2", "conv2"]
    assert sum(r.saved_bytes for r in rows) == g


CASES = [
    ("backprop", "backprop"),
    ("checkpointed", "checkpointed"),
    ("checkpointed(every=4)", pob.Checkpointed(every=4)),
    ("interpolated(nodes=8)", pob.Interpolated(nodes=8)),
    ("interpolating", "interpolating"),
    ("interpolating(checkpointing)", pob.Interpolating(checkpointing=True)),
    ("backsolve", "backsolve"),
]


@pytest.mark.parametrize("t", [(0.0, 1.0), (0.0, 0.25, 1.0)])
def test_prediction_matches_measured_fixed_grid(func_and_state, t):
    """rk4 with 16 steps (known step count): prediction within 25% of the measured bytes (it is
    exact here), and checkpointed / interpolated keep a small fraction of backprop's graph."""
    func, x = func_and_state
    g, _ = probe_func(func, x)
    kept = {}
    for label, sens in CASES:
        block = ODEBlock(func, t=t, method="rk4", steps=STEPS, sensitivity=sens)
        m = measure_saved_bytes(lambda block=block: block(x), exclude=[block])
        assert block.stats.steps_forward == STEPS
        p = predict_backward_bytes(sens, state_bytes=S_BYTES, steps=STEPS, eval_saved_bytes=g,
                                   method="rk4", n_outputs=len(t))
        assert abs(m.total_bytes - p.kept_bytes) <= 0.25 * p.kept_bytes, (label, m, p)
        assert p.peak_bytes >= p.kept_bytes
        kept[label] = m.total_bytes
        del m
    assert kept["backprop"] >= STEPS * 4 * g  # every stage's activations
    assert kept["checkpointed"] < 0.15 * kept["backprop"]
    assert kept["interpolated(nodes=8)"] < 0.15 * kept["backprop"]
    assert kept["checkpointed(every=4)"] < kept["checkpointed"]
    assert kept["backsolve"] == len(t) * S_BYTES  # only the outputs


def test_prediction_matches_measured_adaptive(func_and_state):
    """dopri5: the accepted step count comes from the solve's statistics."""
    func, x = func_and_state
    g, _ = probe_func(func, x)
    for sens in ("backprop", "checkpointed", "interpolating"):
        block = ODEBlock(func, rtol=1e-5, atol=1e-5, sensitivity=sens)
        m = measure_saved_bytes(lambda block=block: block(x), exclude=[block])
        p = predict_backward_bytes(sens, state_bytes=S_BYTES, steps=block.stats.steps_forward,
                                   eval_saved_bytes=g, method="dopri5")
        assert block.stats.steps_forward >= 2
        assert abs(m.total_bytes - p.kept_bytes) <= 0.25 * p.kept_bytes, (sens, m, p)


def test_predict_backward_bytes_formulas():
    s, g = 1000, 3000
    assert predict_backward_bytes("backprop", state_bytes=s, steps=10, eval_saved_bytes=g,
                                  method="rk4").kept_bytes == 40 * g
    # dopri5 is FSAL: 6 new evaluations per step plus the first.
    assert predict_backward_bytes("backprop", state_bytes=s, steps=10, eval_saved_bytes=g,
                                  method="dopri5").kept_bytes == 61 * g
    ck = predict_backward_bytes(pob.Checkpointed(every=3), state_bytes=s, steps=10, eval_saved_bytes=g,
                                method="rk4")
    assert ck.kept_bytes == (2 + 4) * s and ck.peak_bytes == ck.kept_bytes + 3 * 4 * g
    assert predict_backward_bytes("checkpointed", state_bytes=s, steps=10, every=5,
                                  method="rk4").kept_bytes == (2 + 2) * s
    it = predict_backward_bytes(pob.Interpolated(nodes=8), state_bytes=s, steps=10, n_outputs=3)
    assert it.kept_bytes == (3 + 2 * 9) * s
    assert predict_backward_bytes("interpolated", state_bytes=s, steps=10, nodes=4).kept_bytes == 7 * s
    assert predict_backward_bytes(pob.Interpolated(nodes="auto", max_nodes=32), state_bytes=s,
                                  steps=10).kept_bytes == (2 + 33) * s
    ip = predict_backward_bytes("interpolating", state_bytes=s, steps=10, method="dopri5")
    assert ip.kept_bytes == (2 + 11 + 40) * s
    ipc = predict_backward_bytes(pob.Interpolating(checkpointing=True), state_bytes=s, steps=16)
    assert ipc.kept_bytes == (2 + 4) * s
    assert predict_backward_bytes("backsolve", state_bytes=s, steps=10).kept_bytes == 2 * s
    with pytest.raises(ValueError):
        predict_backward_bytes("nonsense", state_bytes=s, steps=1)


class _EveryStage(pob.Sensitivity):
    """A gradient method of one's own that keeps one state per stage of every step."""

    name = "every_stage"

    def solve(self, prob, y0):
        return pob.Backprop().solve(prob, y0)

    def predict_backward_bytes(self, size, *, nodes=None, every=None, checkpointing=None):
        kept = size.outputs_bytes + size.steps * size.stages * size.state_bytes
        return pob.sensitivity.BackwardMemory(self.name, kept, kept + size.eval_saved_bytes)


def test_a_new_gradient_method_predicts_its_own_memory():
    """The prediction lives with the method: a sixth method is predicted from the tableau's sizes
    without teaching this module its name; one without a memory model is refused with the fix."""
    s, g, steps = 1000, 3000, 10
    for method in ("rk4", "dopri5"):
        p = predict_backward_bytes(_EveryStage(), state_bytes=s, steps=steps, eval_saved_bytes=g,
                                   method=method, n_outputs=3)
        assert p.sensitivity == "every_stage"
        assert p.kept_bytes == 3 * s + steps * pob.TABLEAUX[method].stages * s
        assert p.peak_bytes == p.kept_bytes + g
    with pytest.raises(ValueError, match="predict_backward_bytes"):
        predict_backward_bytes(type("NoModel", (_EveryStage,), {"name": "no_model",
                                                   "predict_backward_bytes": pob.Sensitivity.predict_backward_bytes})(),
                               state_bytes=s, steps=steps)


def test_memory_report_of_a_model():
    torch.manual_seed(0)
    # An explicit node count: with the default nodes="auto" the kept count depends on the data
    # and the prediction is its upper bound.
    net = IRDMClassifier(num_classes=10, in_channels=3, width=8, method="rk4", steps=8,
                         sensitivity=pob.Interpolated(nodes=16))
    x = torch.randn(4, 3, 16, 16)
    bn = net.stem[1]
    running = bn.running_mean.clone()
    rep = memory_report(net, x)
    torch.testing.assert_close(bn.running_mean, running)  # buffers restored
    names = [r.name for r in rep.layers]
    assert names == ["stem.0", "stem.1", "stem.2", "ode", "head.0", "head.1", "head.2"]
    conv = rep.layers[0]
    assert conv.output_shape == (4, 8, 16, 16) and conv.activation_bytes == 4 * 8 * 16 * 16 * 4
    assert conv.param_bytes == (8 * 3 * 9 + 8) * 4
    (blk,) = rep.ode_blocks
    s = 4 * 8 * 16 * 16 * 4
    assert blk.name == "ode" and blk.state_bytes == s and blk.steps == 8 and blk.configured == "interpolated"
    assert set(blk.predictions) == {"backprop", "checkpointed", "interpolated", "interpolating", "backsolve"}
    # The block's measured bytes (its input is attributed to the stem's ReLU, which saved it first).
    pred = blk.predictions["interpolated"].kept_bytes
    assert abs(blk.measured_kept_bytes - pred) <= 0.25 * pred
    assert blk.predictions["backprop"].kept_bytes > 5 * blk.predictions["checkpointed"].kept_bytes
    # A budget between the two peaks: checkpointed fits, backprop does not.
    budget = (2 * rep.param_bytes + rep.input_bytes
              + (rep.total_peak("checkpointed") + rep.total_peak("backprop")) // 2)
    fits = rep.fits(budget)
    assert "checkpointed" in fits and "backprop" not in fits
    text = str(rep)
    for word in ("stem.0", "ODEBlock", "backprop", "checkpointed", "interpolated", "TOTAL", "act#2"):
        assert word in text
    # The account runs a forward only; the model still trains afterwards.
    net(x).sum().backward()


def test_memory_report_of_a_bare_function(func_and_state):
    func, x = func_and_state
    rep = memory_report(func, x, method="rk4", steps=STEPS, sensitivity="checkpointed")
    (blk,) = rep.ode_blocks
    assert blk.steps == STEPS and blk.measured_kept_bytes is None and blk.configured == "checkpointed"
    assert rep.total_kept() == blk.predictions["checkpointed"].kept_bytes
    # The configured method's own settings enter its prediction.
    rep_n = memory_report(func, x, method="rk4", steps=STEPS, sensitivity=pob.Interpolated(nodes=8))
    assert rep_n.ode_blocks[0].predictions["interpolated"].kept_bytes == (2 + 9) * S_BYTES
    # Without a step count, one solve counts the steps.
    rep2 = memory_report(func, x, method="dopri5", rtol=1e-5, atol=1e-5)
    assert rep2.ode_blocks[0].steps >= 2
    # A plain callable (no layers to hook) still gets its per-evaluation bytes.
    lin = nn.Linear(C * H * H, C * H * H)
    rep3 = memory_report(lambda t, z: torch.tanh(lin(z)), torch.randn(B, C * H * H), steps=4, method="rk4")
    assert rep3.ode_blocks[0].eval_saved_bytes >= B * C * H * H * 4


def test_measure_saved_bytes_plain_autograd():
    lin = nn.Linear(100, 50)
    x = torch.randn(10, 100)
    m = measure_saved_bytes(lambda: torch.tanh(lin(x)), exclude=[lin])
    # linear saves its input (x, 4000 B), tanh its output (2000 B)
    assert m.total_bytes == 10 * 100 * 4 + 10 * 50 * 4 and m.context_bytes == 0
    with torch.no_grad():
        assert measure_saved_bytes(lambda: torch.tanh(lin(x)), exclude=[lin]).total_bytes > 0


@pytest.mark.cuda
def test_prediction_matches_cuda_allocator():
    """On a GPU the allocator's growth across the forward is what the methods keep (+ output)."""
    torch.manual_seed(0)
    func = ODEConvFunc(32).cuda()
    x = torch.randn(32, 32, 16, 16, device="cuda")
    s = x.numel() * 4
    g, _ = probe_func(func, x)
    for sens in ("backprop", "checkpointed", "interpolated"):
        block = ODEBlock(func, method="rk4", steps=STEPS, sensitivity=sens)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = block(x)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        p = predict_backward_bytes(sens, state_bytes=s, steps=STEPS, eval_saved_bytes=g, method="rk4")
        assert abs(grown - p.kept_bytes) <= 0.25 * p.kept_bytes + 2 * s, (sens, grown, p)
        del y
