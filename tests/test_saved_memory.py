"""What each gradient method keeps alive for the backward, measured (not predicted):
autograd's saved tensors through ``saved_tensors_hooks`` plus every tensor newly reachable from
Python objects (checkpoints, interpolation nodes, dense output held by the autograd context)."""
import gc

import pytest
import torch

import pyode_bridge as pob


def _storages(tensors):
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def _reachable_tensors(root, limit=200_000):
    """Tensors reachable from ``root`` through Python references (the autograd context's
    attributes: checkpoints, interpolation nodes, dense output)."""
    seen, stack, found = set(), [root], []
    while stack and len(seen) < limit:
        obj = stack.pop()
        if obj is None or id(obj) in seen or isinstance(obj, (type, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        stack.extend(gc.get_referents(obj))
    return found


def saved_bytes(run, exclude):
    """Bytes of tensor storage kept for backward by ``run()``: autograd-saved tensors (hooks) and
    tensors the graph's Python nodes hold, less the output and the ``exclude`` tensors (inputs and
    parameters, which exist anyway)."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (packed.append(t), t)[1], lambda t: t):
        out = run()
    kept = _storages(packed)
    # The memory-lean methods keep their checkpoints / nodes / dense output on the autograd context.
    kept.update(_storages(_reachable_tensors(getattr(out.grad_fn, "saved", None))))
    skip = set(_storages([out] + list(exclude)))
    return sum(n for p, n in kept.items() if p not in skip), out


class ConvFunc(torch.nn.Module):
    def __init__(self, layers=2, ch=8):
        super().__init__()
        mods = []
        for i in range(layers):
            mods.append(torch.nn.Conv2d(ch, ch, 3, padding=1))
            if i < layers - 1:
                mods.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*mods)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(0.3)

    def forward(self, t, y):
        return self.net(y)


def _measure(sens, layers, steps=200):
    torch.manual_seed(0)
    func = ConvFunc(layers)
    y0 = torch.randn(2, 8, 8, 8, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    stats = pob.SolveStats()
    kept, out = saved_bytes(lambda: pob.odeint(func, y0, t, method="rk4", options={"step_size": 1.0 / steps},
                                               sensitivity=sens, stats=stats),
                            exclude=[y0] + list(func.parameters()))
    out[-1].sum().backward()  # the saved data really serves a backward
    assert stats.steps_forward == steps
    return kept


@pytest.fixture(scope="module")
def measured():
    # interpolated with 16 nodes (IRDM's setting); "auto" keeps a data-dependent count
    return {(s, L): _measure(pob.Interpolated(nodes=16) if s == "interpolated" else s, L)
            for s in ("backprop", "checkpointed", "interpolated", "backsolve") for L in (2, 6)}


def test_lean_methods_keep_a_small_fraction_of_backprop(measured):
    state = 2 * 8 * 8 * 8 * 4  # bytes of one state
    bp = measured[("backprop", 2)]
    assert bp > 200 * 4 * state  # backprop keeps several tensors per stage of every step
    # checkpointed: one state per step (200) and nothing else of note
    assert measured[("checkpointed", 2)] < 0.2 * bp
    assert measured[("checkpointed", 2)] < 1.2 * 201 * state
    # interpolated: 17 Chebyshev states for the single output interval
    assert measured[("interpolated", 2)] < 0.02 * bp
    assert measured[("interpolated", 2)] <= 20 * state
    assert measured[("backsolve", 2)] <= 3 * state


def test_lean_memory_does_not_grow_with_layers(measured):
    assert measured[("backprop", 6)] > 2 * measured[("backprop", 2)]
    for s in ("interpolated", "backsolve", "checkpointed"):
        assert measured[(s, 6)] == measured[(s, 2)], s
