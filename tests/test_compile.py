"""``torch.compile``d right-hand sides work with every gradient method and give the uncompiled
func's outputs and gradients.

Backend: ``aot_eager`` - it runs the dynamo capture and AOTAutograd (the compiled forward *and*
backward graphs, which is where a gradient method could go wrong) without code generation.
Measured for this file on the 2-core CPU test machine (one thread, shared): ``aot_eager`` 11-15 s;
``inductor`` 52-61 s with a cold cache (C++ code generation), 13 s with a warm one - too close to
the one-minute budget for CI. Both give the uncompiled gradients (inductor to ~6e-15); set
``PYODE_COMPILE_BACKEND=inductor`` to run this file with it.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge.nn import ConcatSquashLinear

torch.set_num_threads(1)

BACKEND = os.environ.get("PYODE_COMPILE_BACKEND", "aot_eager")
SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve",
                 pob.Interpolating(checkpointing=True, every=2), pob.Interpolated(nodes="auto"),
                 pob.Checkpointed(every=3)]
T = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
# Comparison tolerances matched to the solve: a fixed-step solve is the same arithmetic (round-off
# only); an adaptive one could in principle take a different step where an error ratio sits on 1.
CASES = {"rk4": (dict(method="rk4", options={"step_size": 0.1}), dict(rtol=1e-10, atol=1e-12)),
         "dopri5": (dict(method="dopri5", rtol=1e-8, atol=1e-8), dict(rtol=1e-6, atol=1e-8))}

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")


class Func(nn.Module):
    """A time-dependent concat-squash MLP (FFJORD's layer) with a tanh in between."""

    def __init__(self, dim=3, hidden=16):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = ConcatSquashLinear(dim, hidden)
        self.l2 = ConcatSquashLinear(hidden, dim)
        self.double()

    def forward(self, t, y):
        return self.l2(t, torch.tanh(self.l1(t, y)))


@pytest.fixture(scope="module")
def funcs():
    """One eager func and its compiled wrapper (sharing parameters), compiled once for the module."""
    torch._dynamo.reset()
    func = Func()
    # fullgraph: no graph breaks, so the whole right-hand side really is one compiled graph.
    compiled = torch.compile(func, backend=BACKEND, fullgraph=True, dynamic=False)
    yield func, compiled
    torch._dynamo.reset()


def _grads(func, sens, case, y0):
    y0 = y0.clone().requires_grad_(True)
    kw = CASES[case][0]
    ys = pob.odeint(func, y0, T, sensitivity=sens, **kw)
    loss = (ys[1] ** 2).sum() + (ys[-1] * torch.tensor([1.0, -2.0, 0.5], dtype=ys.dtype)).sum()
    grads = torch.autograd.grad(loss, [y0] + list(func.parameters()))
    return ys.detach(), grads


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=str)
def test_compiled_func_gives_the_same_gradients(funcs, sens, case):
    func, compiled = funcs
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in func.parameters()]
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ys_c, g_c = _grads(compiled, sens, case, y0)
    ys_e, g_e = _grads(func, sens, case, y0)
    tol = CASES[case][1]
    torch.testing.assert_close(ys_c, ys_e, **tol)
    assert len(g_c) == len(g_e) == 1 + len(list(func.parameters()))
    for a, b in zip(g_c, g_e):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.timeout(120)
def test_compiled_func_compiles_a_bounded_number_of_graphs(funcs):
    """``odeint`` passes ``t`` as a 0-d tensor, so a compiled func is not specialised on each step's
    time (a Python float would recompile at every step): all methods, both solvers and a second
    solve at other times reuse a handful of graphs (grad mode on/off, input requiring grad or not)."""
    from torch._dynamo.utils import counters

    # The count is process-wide: graphs other tests compiled before this one must not count.
    torch._dynamo.reset()
    counters.clear()
    func, compiled = funcs
    y0 = torch.randn(5, 3, dtype=torch.float64)
    for sens in SENSITIVITIES:  # warm every code path first
        for case in CASES:
            _grads(compiled, sens, case, y0)
    before = dict(counters["stats"])
    for sens in SENSITIVITIES:
        for case in CASES:
            _grads(compiled, sens, case, y0 * 0.5)
    with torch.no_grad():
        pob.odeint(compiled, y0, torch.tensor([1.0, 0.2], dtype=torch.float64))
    assert dict(counters["stats"]).get("unique_graphs", 0) == before.get("unique_graphs", 0), (
        before, dict(counters["stats"]))
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sens", ["backprop", "interpolated", "backsolve"])
def test_odeblock_with_compiled_func_trains_like_the_eager_one(funcs, sens):
    """Inside an ODEBlock (the module path: parameters found through the compiled wrapper)."""
    func, compiled = funcs
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for f in (compiled, func):
        block = pob.ODEBlock(f, method="rk4", steps=5, sensitivity=sens)
        assert len(list(block.parameters())) == len(list(func.parameters()))
        block.zero_grad(set_to_none=True)
        block(x).pow(2).mean().backward()
        results.append([p.grad.clone() for p in block.parameters()])
        block.zero_grad(set_to_none=True)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
