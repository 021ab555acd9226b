"""The speed paths of issue 12 compute what the plain paths compute.

Stacked stage combinations, batched dense output (many output times), deferred NaN/Inf checks,
the identity-check of func's output, prefetched z(t) in fixed-step adjoint sweeps, the step size
carried across output intervals, and the opt-in compiled step: each against the reference it
replaces (round-off), or against the property it must keep (an error names the exact step).
"""
from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge.sensitivity._adjoint import _PrefetchedZ, _stage_times
from pyode_bridge.sensitivity.bli import BarycentricInterpolant, chebyshev_points
from pyode_bridge.solvers import TABLEAUX, ControlOptions, SolverConfig, TimeOptions, integrate
from pyode_bridge.solvers.combine import StageRow, combine, combine_stages
from pyode_bridge.solvers.dense import DenseSolution
from pyode_bridge.solvers.loop import all_finite

F64 = torch.float64
ALL = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve"]


def _times_in(msg):
    return [float(x) for x in re.findall(r"t=(-?[0-9.]+(?:e[-+]?[0-9]+)?)", msg)]


class MLP(nn.Module):
    def __init__(self, dim=2, hidden=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.double()

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t)


def _grads(func, y0, t, **kw):
    y = y0.clone().requires_grad_(True)
    ys = pob.odeint(func, y, t, **kw)
    loss = (ys * torch.linspace(-1.0, 1.0, ys.numel(), dtype=ys.dtype).view_as(ys)).sum()
    return ys.detach(), torch.autograd.grad(loss, [y] + list(func.parameters()))


# --- the identity field: an adjoint method must not negate its own state --------------------------


@pytest.mark.parametrize("sens", ALL)
def test_identity_field_gradient(sens):
    """``dy/dt = y + p``: the vector-Jacobian product w.r.t. y (and p) *is* the incoming adjoint,
    so an in-place negation of the product negated the adjoint state itself (a silently wrong
    gradient, 2.11 instead of e). Exact: ``dy(1)/dy0 = e``, ``dy(1)/dp = e - 1`` (rk4 h = 0.05)."""

    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(3, dtype=F64))

        def forward(self, t, y):
            return y + self.p

    func = Shift()
    y0 = torch.ones(3, dtype=F64, requires_grad=True)
    ys = pob.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), method="rk4",
                    options={"step_size": 0.05}, sensitivity=sens)
    ys[-1].sum().backward()
    torch.testing.assert_close(y0.grad, torch.full((3,), math.e, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(func.p.grad, torch.full((3,), math.e - 1, dtype=F64), rtol=1e-6, atol=0)


# --- stacked stage combinations ------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 5000, 20000])
@pytest.mark.parametrize("grad", [False, True])
def test_combine_stages_equals_combine(n, grad):
    """Both the stacked (addmv) and the add-chain branch give the plain sum, with grad or not, and
    a stage with a zero coefficient never enters (an Inf there would make NaN of 0 * Inf); so does
    the compiled step's form, with ``h`` a 0-d tensor."""
    g = torch.Generator().manual_seed(n)
    vs = [torch.randn(n, dtype=F64, generator=g, requires_grad=grad) for _ in range(6)]
    vs[1] = torch.full((n,), math.inf, dtype=F64)
    base = torch.randn(n, dtype=F64, generator=g)
    coefs = (0.3, 0.0, -1.2, 0.7, 2.0, -0.4)
    h = 0.125
    with torch.set_grad_enabled(grad):
        got = combine_stages(base, vs, StageRow(coefs), h)
        ref = combine(base, [(h * c, v) for c, v in zip(coefs, vs)])
        got0 = combine_stages(None, vs, StageRow(coefs), h)
        hh = torch.tensor(h, dtype=F64)
        got_t, got0_t = (combine_stages(b, vs, StageRow(coefs), hh) for b in (base, None))
        one_t = combine_stages(base, vs, StageRow((0.0, 0.0, 0.5)), hh)
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(got_t).all())
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    for g_, r_ in ((got0, ref - base), (got_t, ref), (got0_t, ref - base), (one_t, base + vs[2] * (h * 0.5))):
        torch.testing.assert_close(g_, r_, rtol=1e-12, atol=1e-12)
    if grad:
        gs = torch.autograd.grad(got.sum(), [vs[0], vs[2]])
        torch.testing.assert_close(gs[0], torch.full((n,), h * 0.3, dtype=F64))
        torch.testing.assert_close(gs[1], torch.full((n,), h * -1.2, dtype=F64))


def test_all_finite_probe():
    """The sum probe: any NaN/Inf is found; finite entries whose sum overflows are not flagged."""
    x = torch.full((10,), 3e38)
    assert not math.isfinite(float(x.sum())) and all_finite(x)
    for bad in (math.nan, math.inf, -math.inf):
        y = torch.ones(1000)
        y[517] = bad
        assert not all_finite(y)


# --- deferred NaN/Inf checks on fixed grids -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fixed_grid_nan_is_named_at_its_exact_step(dtype):
    """Checked every few steps, a NaN is still reported at the step that produced it."""
    t_bad = 0.5371

    def func(t, y):
        return -y if float(t) <= t_bad else y * math.nan

    with pytest.raises(pob.SolverError, match="NaN/Inf") as info:
        pob.odeint(func, torch.ones(4, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype),
                   method="rk4", options={"step_size": 1e-3})
    t0, t1 = _times_in(str(info.value))[:2]
    assert t0 <= t_bad < t1 and t1 - t0 == pytest.approx(1e-3), str(info.value)


def test_solve_ended_early_checks_its_last_steps():
    """A solve that on_step ends before the next scheduled check (an event) still checks the
    steps it took since the last one."""
    from pyode_bridge._state import FlatRHS, StateSpec

    y0 = torch.ones(3, dtype=F64)
    rhs = FlatRHS(lambda t, y: -y if float(t) < 0.02 else y * math.nan, StateSpec(y0), F64, "rk4")
    cfg = SolverConfig(TABLEAUX["rk4"], time=TimeOptions(step_size=0.01, dtype=F64))
    count = [0]

    def stop_at_fourth(step):
        count[0] += 1
        return count[0] == 4

    with pytest.raises(pob.SolverError, match="NaN/Inf") as info:
        integrate(rhs, y0, [0.0, 1.0], cfg, on_step=stop_at_fourth)
    # The first NaN is rk4's last stage (t + h = 0.02) of the step from 0.01 to 0.02.
    assert count[0] == 4 and _times_in(str(info.value))[:2] == pytest.approx([0.01, 0.02])


def test_fixed_grid_huge_finite_state_is_not_an_error():
    """float32 entries near the largest float sum to Inf; the state is still finite."""
    y0 = torch.full((10,), 3e38)
    ys = pob.odeint(lambda t, y: torch.zeros_like(y), y0, torch.tensor([0.0, 1.0]), method="rk4",
                    options={"step_size": 0.01})
    assert torch.equal(ys[-1], y0)


def test_nan_in_the_parameter_quadrature_is_named():
    """The adjoint's parameter integral is checked on the same schedule, at its exact step."""
    a = torch.tensor(1.0, dtype=F64, requires_grad=True)

    class Bad(torch.autograd.Function):  # identity whose derivative is NaN for t < 0.3
        @staticmethod
        def forward(ctx, x, t):
            ctx.t = float(t)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return (g * math.nan if ctx.t < 0.3 else g), None

    ys = pob.odeint(lambda t, y: Bad.apply(-a * y, t), torch.ones(3, dtype=F64, requires_grad=True),
                    torch.tensor([0.0, 1.0], dtype=F64), method="rk4", options={"step_size": 0.01},
                    sensitivity="interpolated", adjoint_params=(a,))
    with pytest.raises(pob.SolverError, match="backward pass.*NaN/Inf") as info:
        ys[-1].sum().backward()
    ts = _times_in(str(info.value))
    assert ts and 0.28 <= max(ts[:2]) <= 0.31, str(info.value)


# --- func's output checked on every call ----------------------------------------------------------


def test_func_keeps_the_times_it_was_given():
    """``t`` is a fresh 0-d tensor per call (of the state's dtype): a func that stores it (or an
    autograd graph that saves it, as for ``t * y``) never sees it change afterwards."""
    seen = []

    def func(t, y):
        seen.append(t)
        return -y * t

    y0 = torch.ones(3, requires_grad=True)
    ys = pob.odeint(func, y0, torch.tensor([0.0, 1.0]), method="rk4", options={"step_size": 0.25})
    ys[-1].sum().backward()  # would fail (version counter) had t been overwritten in place
    expect = [k * 0.25 + c * 0.25 for k in range(4) for c in (0.0, 1 / 3, 2 / 3, 1.0)]
    assert [float(t) for t in seen] == pytest.approx(expect)
    assert all(t.dtype == torch.float32 and t.dim() == 0 for t in seen)
    assert len({id(t) for t in seen}) == len(seen)
    torch.testing.assert_close(y0.grad, torch.full((3,), math.exp(-0.5)), rtol=1e-3, atol=0)


def test_output_shape_change_mid_solve_is_an_error():
    """Not only the first call: a (1,)-shaped output later would otherwise broadcast silently."""
    def func(t, y):
        return -y if float(t) < 0.5 else -y[:1]

    with pytest.raises(pob.SolverError, match=r"shape \(1,\).*same shape as y"):
        pob.odeint(func, torch.ones(3), torch.tensor([0.0, 1.0]), method="rk4",
                   options={"step_size": 0.1})

    def func2(t, y):
        return -y if float(t) < 0.5 else (-y).double()

    with pytest.raises(ValueError, match="func returned dtype torch.float64"):
        pob.odeint(func2, torch.ones(3), torch.tensor([0.0, 1.0]))


# --- many output times ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4"])
def test_many_outputs_equal_one_by_one_dense_output(method):
    """500 output times (many per step, evaluated as blocks) equal each step's continuous
    extension evaluated time by time."""
    func = MLP(hidden=8)
    y0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0.0, 2.0, 500, dtype=F64)
    opts = {"step_size": 0.25} if method == "rk4" else None
    steps = DenseSolution()
    cfg = SolverConfig(TABLEAUX[method], ControlOptions(rtol=1e-6, atol=1e-8),
                       TimeOptions(step_size=0.25 if opts else None, dtype=F64))
    from pyode_bridge._state import FlatRHS, StateSpec
    spec = StateSpec(y0)
    with torch.no_grad():
        res = integrate(FlatRHS(func, spec, F64, method), y0.reshape(-1), t.tolist(), cfg,
                        on_step=steps.append)
        ref = torch.stack([y0.reshape(-1)] + [steps.evaluate(float(tt)) for tt in t[1:]])
        ys = pob.odeint(func, y0, t, rtol=1e-6, atol=1e-8, method=method, options=opts)
    assert res.stacked().shape == (500, 8)
    torch.testing.assert_close(res.stacked(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(res.ys), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ys.reshape(500, -1), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(steps.evaluate_many(t[1:].tolist()[::-1]), ref[1:].flip(0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_many_outputs_gradient_equals_checkpointed(method):
    """With many output times per step, backprop (through the batched blocks) and checkpointed
    (recomputing them) are both the exact gradient of the discrete map."""
    func = MLP(hidden=8)
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0.0, 1.5, 120, dtype=F64)
    kw = dict(method=method, rtol=1e-7, atol=1e-9, options={"step_size": 0.1} if method == "rk4" else None)
    ys_b, g_b = _grads(func, y0, t, sensitivity="backprop", **kw)
    ys_c, g_c = _grads(func, y0, t, sensitivity="checkpointed", **kw)
    torch.testing.assert_close(ys_c, ys_b, rtol=0, atol=0)
    for a, b in zip(g_c, g_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- adjoint sweeps --------------------------------------------------------------------------------


def test_prefetched_z_equals_direct_evaluation():
    """Batches of stage times (small batches, to cross block edges) give the interpolant's values
    at every time the sweep asks, including repeated times and times outside the table."""
    g = torch.Generator().manual_seed(5)
    interp = BarycentricInterpolant(0.0, 1.0, torch.randn(17, 6, dtype=F64, generator=g))
    cfg = SolverConfig(TABLEAUX["rk4"], time=TimeOptions(step_size=0.1))
    times = _stage_times(cfg, 1.0, 0.0)
    assert len(times) == 40 and times[0] == 1.0
    z = _PrefetchedZ(interp, times, rows=7)
    asked = times + [times[3], 0.123456]
    for t in asked:
        torch.testing.assert_close(z(t), interp(t), rtol=1e-14, atol=1e-14)
    assert _stage_times(SolverConfig(TABLEAUX["dopri5"]), 1.0, 0.0) is None
    # step_t / jump_t are step boundaries of a fixed grid too: their stage times are the solve's
    stopped = _stage_times(SolverConfig(TABLEAUX["rk4"], time=TimeOptions(step_size=0.1, jump_t=(0.35,))), 0.0, 1.0)
    assert 0.35 in stopped[::4] and len(stopped) == 44


def test_barycentric_coefficient_matrix_equals_coefficients():
    interp = BarycentricInterpolant(0.2, 1.1, torch.zeros(17, 1))
    ts = [0.2, 0.21, chebyshev_points(16, 0.2, 1.1)[5], 0.7, 1.1, 1.3, -1.0]
    ref = torch.tensor([interp.coefficients(t) for t in ts], dtype=F64)
    torch.testing.assert_close(interp.coefficient_matrix(ts), ref, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("sens", ["interpolated", "interpolating", "backsolve"])
def test_step_size_carried_across_output_intervals(sens):
    """100 output intervals: each backward interval starts from the previous one's step size, so
    a smooth problem takes one dopri5 step (7 evaluations) per interval instead of paying the
    initial-step probe at each (8); the gradient stays within tolerance of the true one (a tight
    checkpointed solve; measured: 4.7e-6 of gradients up to 70, as with the probe)."""
    func = MLP(hidden=8)
    y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    t = torch.linspace(0.0, 1.0, 101, dtype=F64)
    st = pob.SolveStats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, g = _grads(func, y0, t, sensitivity=sens, rtol=1e-6, atol=1e-8, stats=st)
    assert st.nfe_backward <= 7 * 100 + 8, st
    _, g_ref = _grads(func, y0, t, sensitivity="checkpointed", rtol=1e-11, atol=1e-13)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("sens", ["interpolated", "interpolating", "checkpointed", "backsolve"])
def test_long_fixed_step_adjoint_matches_backprop(sens):
    """1000 rk4 steps with a parameter (the benchmark's row): every method's gradient equals
    backprop's (exact discrete) to the tolerance of its own z(t)."""
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y0 = torch.linspace(-1.0, 1.0, 10, dtype=F64)
    out = []
    for s in ("backprop", sens):
        y = y0.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ys = pob.odeint(lambda t, yy: -a * yy * (1 + 0.3 * torch.sin(5 * t)), y,
                            torch.tensor([0.0, 0.3, 1.0], dtype=F64), method="rk4",
                            options={"step_size": 1e-3}, sensitivity=s, adjoint_params=(a,))
        out.append(torch.autograd.grad(ys[1:].square().sum(), (y, a)))
    tol = 1e-12 if sens == "checkpointed" else 1e-6
    for g, r in zip(*out):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


# --- the compiled step ------------------------------------------------------------------------------

BACKEND = os.environ.get("PYODE_COMPILE_BACKEND", "aot_eager")
COMPILE = {"backend": BACKEND} if BACKEND != "inductor" else True
needs_compile = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")


@needs_compile
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sens", ["backprop", "checkpointed", "interpolating", "interpolated"])
@pytest.mark.parametrize("method,opts", [("rk4", {"step_size": 0.1}), ("dopri5", {})])
def test_compiled_step_equals_eager(method, opts, sens):
    """Same values, gradients and NFE as the eager step (round-off; the aot_eager backend by
    default, PYODE_COMPILE_BACKEND=inductor for code generation)."""
    func = MLP(hidden=16)
    y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.0, 0.37, 1.0], dtype=F64)
    res = []
    for o in (dict(opts), dict(opts, compile=COMPILE)):
        st = pob.SolveStats()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res.append(_grads(func, y0, t, method=method, options=o, sensitivity=sens, rtol=1e-8,
                              atol=1e-8, stats=st) + ((st.nfe_forward, st.nfe_backward),))
    (ys_e, g_e, n_e), (ys_c, g_c, n_c) = res
    assert n_c == n_e
    torch.testing.assert_close(ys_c, ys_e, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_compile
@pytest.mark.timeout(180)
def test_compiled_step_compiles_once_in_a_training_loop():
    """Repeated solves with the same func (new y0, new times, new parameters after a step) reuse
    the compiled graphs; the whole step is one graph (no break in the solver's own code)."""
    from torch._dynamo.utils import counters

    func = MLP(hidden=16, seed=1)
    opt = torch.optim.SGD(func.parameters(), lr=1e-2)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    compile_kw = dict(COMPILE, fullgraph=True) if isinstance(COMPILE, dict) else {"fullgraph": True}

    def train_step(seed, t):
        y0 = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        pob.odeint(func, y0, t, options={"compile": compile_kw}).square().mean().backward()
        opt.step()

    train_step(0, t)
    train_step(1, t * 1.5)
    before = counters["stats"]["unique_graphs"]
    for seed in range(2, 5):
        train_step(seed, t * (1 + seed / 10))
    assert counters["stats"]["unique_graphs"] == before


@needs_compile
@pytest.mark.timeout(180)
def test_compiled_step_tuple_state():
    """A tuple state (a CNF's ``(z, logp)``) through the compiled step: same values and gradients."""
    lin = nn.Linear(2, 2).double()

    def f(t, s):
        z, logp = s
        return torch.tanh(lin(z)) * t, -(z ** 2).sum(1, keepdim=True)

    z0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    out = []
    for o in ({}, {"compile": COMPILE}):
        z = z0.clone().requires_grad_(True)
        zs, ls = pob.odeint(f, (z, torch.zeros(4, 1, dtype=F64)), t, options=o)
        out.append((zs.detach(), ls.detach(), torch.autograd.grad(zs.sum() + ls.sum(), [z, lin.weight])))
    (za, la, ga), (zb, lb, gb) = out
    torch.testing.assert_close(zb, za, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-12)
    for a, b in zip(gb, ga):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_compile
@pytest.mark.timeout(180)
@pytest.mark.parametrize("method,opts", [("rk4", {"step_size": 0.1}), ("dopri5", {})])
def test_compiled_step_with_jump_t_and_perturb(method, opts):
    """Steps whose evaluations are moved off their ends (jump_t, perturb) run eagerly inside a
    compiled solve: same values and gradients as the eager solve."""
    func = MLP(hidden=8)
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    for extra in ({"jump_t": torch.tensor([0.35], dtype=F64)}, {"perturb": True}):
        res = [_grads(func, y0, t, method=method, options=dict(opts, **extra, **c))
               for c in ({}, {"compile": COMPILE})]
        (ys_e, g_e), (ys_c, g_c) = res
        torch.testing.assert_close(ys_c, ys_e, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compile_option_is_checked():
    f = lambda t, y: -y  # noqa: E731
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="torch.compile's keywords"):
        pob.odeint(f, y0, t, options={"compile": {"backnd": "eager"}})
    with pytest.raises(ValueError, match="must be True, False or a dict"):
        pob.odeint(f, y0, t, options={"compile": "yes"})
    with pytest.raises(ValueError, match="explicit Runge-Kutta steps"):
        pob.odeint(f, y0, t, method="implicit_adams", options={"compile": True, "step_size": 0.1})
    with pytest.raises(ValueError, match="explicit Runge-Kutta steps"):
        pob.odeint(f, y0, t, method="radauIIA3", options={"compile": True, "step_size": 0.1})
    with pytest.raises(ValueError, match="backend='julia'"):
        pob.odeint(f, y0, t, options={"compile": True}, backend="julia")
    # False is the plain path
    torch.testing.assert_close(pob.odeint(f, y0, t, options={"compile": False}), pob.odeint(f, y0, t))


# --- the CUDA-graph path for fixed grids ------------------------------------------------------------


@pytest.mark.parametrize("method,opts", [("rk4", {"step_size": 0.05}), ("dopri5", {"step_size": 0.1}),
                                         ("midpoint", {"grid": [0.0, 0.1, 0.25, 0.5, 0.7, 1.0]})])
def test_cuda_graph_solve_body_equals_odeint(method, opts):
    """What ``options={"cuda_graph": True}`` captures (run here eagerly, on the CPU): the same
    outputs as odeint, and the evaluation count it reports per replay."""
    from pyode_bridge._state import StateSpec
    from pyode_bridge._validate import make_config
    from pyode_bridge.solvers.cuda_graph import _Solve, output_steps, tab_stages

    func = MLP(hidden=8)
    y0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0.0, 0.5, 0.7, 1.0], dtype=F64)
    cfg = make_config(method, opts, 1e-7, 1e-9, F64)
    from pyode_bridge._state import FlatRHS
    from pyode_bridge.solvers import make_grid
    grid = make_grid(0.0, 1.0, cfg.time.step_size, cfg.time.grid, t.tolist())
    out_steps = output_steps(grid, t.tolist())
    rhs = FlatRHS(func, StateSpec(y0), F64, method)
    body = _Solve(rhs, cfg.method, grid, out_steps, cfg, list(func.parameters()))
    assert [p is q for p, q in zip(body.parameters(), func.parameters())] == [True] * 4
    st = pob.SolveStats()
    ref = pob.odeint(func, y0, t, method=method, options=opts, stats=st)
    got = body(y0.reshape(-1))
    # Outputs within an ulp of a grid point (0.7 vs 14 * 0.05) are that point's state, where the
    # eager solve evaluates the dense output a hair before it: equal to round-off.
    torch.testing.assert_close(got, ref.reshape(4, -1), rtol=1e-12, atol=1e-12)
    assert rhs.nfe == st.nfe_forward == (len(grid) - 1) * tab_stages(cfg.method) + cfg.method.fsal


def test_cuda_graph_requirements_are_named():
    from pyode_bridge._validate import make_config
    from pyode_bridge.solvers.cuda_graph import check_cuda_graph

    cuda = torch.device("cuda")
    t = [0.0, 0.35, 1.0]
    with pytest.raises(ValueError, match="every output time on the step grid.*t=0.35"):
        check_cuda_graph(make_config("rk4", {"step_size": 0.1}, 1e-7, 1e-9, F64), t, cuda, "backprop")
    with pytest.raises(ValueError, match="sensitivity='backprop'"):
        check_cuda_graph(make_config("rk4", None, 1e-7, 1e-9, F64), t, cuda, "checkpointed")
    with pytest.raises(ValueError, match="fixed grid"):
        check_cuda_graph(make_config("dopri5", None, 1e-7, 1e-9, F64), t, cuda, "backprop")
    with pytest.raises(ValueError, match="does not combine with perturb, jump_t"):
        check_cuda_graph(make_config("rk4", {"perturb": True, "jump_t": torch.tensor([0.5])}, 1e-7,
                                     1e-9, F64), t, cuda, "backprop")
    with pytest.raises(ValueError, match="CUDA state"):
        pob.odeint(lambda tt, y: -y, torch.ones(2), torch.tensor(t), method="rk4",
                   options={"cuda_graph": True})
    with pytest.raises(ValueError, match="True or False"):
        pob.odeint(lambda tt, y: -y, torch.ones(2), torch.tensor(t), method="rk4",
                   options={"cuda_graph": "yes"})
    check_cuda_graph(make_config("rk4", None, 1e-7, 1e-9, F64), t, cuda, "backprop")  # t is the grid


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph path needs a CUDA device")
@pytest.mark.parametrize("method,opts", [("rk4", {"step_size": 0.05}), ("dopri5", {"step_size": 0.1})])
def test_cuda_graph_training_equals_eager(method, opts):
    """Captured once, replayed: the same outputs and gradients as the eager solve, a fresh output
    per call (the graph's buffer is not handed out), parameter updates seen by the replay."""
    func = MLP(hidden=32).cuda()
    opt = torch.optim.SGD(func.parameters(), lr=0.1)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, device="cuda")
    kept = []
    for seed in range(3):
        y0 = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(seed)).cuda()
        res = []
        for o in (dict(opts), dict(opts, cuda_graph=True)):
            res.append(_grads(func, y0, t, method=method, options=o))
        (ys_e, g_e), (ys_g, g_g) = res
        torch.testing.assert_close(ys_g, ys_e, rtol=1e-12, atol=1e-12)
        for a, b in zip(g_g, g_e):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        kept.append(ys_g.clone())
        opt.zero_grad()
        pob.odeint(func, y0, t, method=method, options=dict(opts, cuda_graph=True)).square().mean().backward()
        opt.step()
    assert not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("n", [10, 200])
def test_stage_combination_rounds_once_onto_the_state(n):
    """The increment is summed before it is added to the state: float32 errors stay at one
    rounding of the state (mean 1.7e-6 here) instead of one per stage term (3.2e-6), which
    float32 rk4 needs to stay within torchdiffeq's own event-test bound."""
    from pyode_bridge.solvers.combine import StageRow, combine_stages

    row = StageRow([0.125, 0.375, 0.375, 0.125])
    g = torch.Generator().manual_seed(0)
    err = 0.0
    for _ in range(300):
        base = torch.randn(n, generator=g) * 100
        vs = [torch.randn(n, generator=g) for _ in range(4)]
        exact = base.double() + 0.01 * (torch.stack(vs).double().T @ torch.tensor(row.coefs, dtype=torch.float64))
        err += (combine_stages(base, vs, row, 0.01).double() - exact).abs().mean().item()
    assert err / 300 < 2.2e-6
