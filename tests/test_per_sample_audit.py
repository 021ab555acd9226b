"""Audit of per-sample solving (issue 18) as a client uses it: every input form (dtypes, reversed
rows, B=1, scalar and image states, fixed steps, per-row stops) against the single solves of the
rows, gradients (dL/dy0, dL/dtheta, dL/dt) against the sums of the single solves' gradients, the
failures per row, and what is refused (second derivatives of the first-order methods, torch.func,
a func of the wrong dtype) with a clear error instead of a wrong answer."""
import pytest
import torch

import pyode_bridge as pob
from pyode_bridge.errors import SolverError
from pyode_bridge.models.cnf import CNFDynamics, ConcatSquashMLP
from pyode_bridge.nn import ODEBlock, ODEConvFunc
from pyode_bridge.solvers.per_sample import SAMPLE_MAX_STEPS, SAMPLE_OK

B = 3
K = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)  # each row's decay rate: its own steps
SENSITIVITIES = ("backprop", "checkpointed", "backsolve", "interpolating", "interpolated")
ADJOINTS = ("backsolve", "interpolating", "interpolated")


def _times(dtype=torch.float64, T=4):
    """Row b on [0.1 b, 1 + 0.37 b]: every row its own span."""
    return torch.stack([torch.linspace(0.1 * b, 1 + 0.37 * b, T, dtype=dtype) for b in range(B)])


def _linear(k, dtype):
    """``-k y + sin(3 t)`` for a row batch (``k`` ``(B,)``, ``t`` ``(B,)``) or one row (``k``, ``t`` 0-d)."""
    k = k.to(dtype)

    def f(t, y):
        rows = (-1,) + (1,) * (y.dim() - 1) if t.dim() else ()
        return -k.reshape(rows) * y + torch.sin(3 * t).to(dtype).reshape(rows)
    return f


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)

    def f(t, y):  # y (R, 2), t 0-d or (R,)
        return net(torch.cat([y, t.to(y.dtype).expand(y.shape[0]).unsqueeze(1)], 1))
    return net, f


def _assert_rows_are_single_solves(ys, y0, t, single, tol, rows=range(B), **kw):
    for b in rows:
        yb = pob.odeint(single(b), y0[b], t[b] if t.dim() == 2 else t, **kw)
        torch.testing.assert_close(ys[:, b], yb, rtol=tol, atol=tol)


# --- forward: each row is its single solve ---------------------------------------------------------

@pytest.mark.parametrize("dtype, t_dtype, tol", [
    # float32: the batch's and the single solve's roundings differ, and so may a step decision.
    (torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-4),
    (torch.float32, torch.float64, 1e-4), (torch.float64, torch.float32, 1e-12)])
@pytest.mark.parametrize("reverse", [False, True])
def test_rows_match_single_solves_across_dtypes_and_directions(dtype, t_dtype, tol, reverse):
    t = _times(t_dtype).flip(1) if reverse else _times(t_dtype)
    y0 = torch.randn(B, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    kw = dict(rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-7 if dtype == torch.float32 else 1e-11)
    stats = pob.SolveStats()
    ys = pob.odeint(_linear(K, dtype), y0, t, stats=stats, **kw)
    assert ys.shape == (4, B, 2) and ys.dtype == dtype
    assert stats.sample_status.tolist() == [SAMPLE_OK] * B
    _assert_rows_are_single_solves(ys, y0, t, lambda b: _linear(K[b], dtype), tol, **kw)


@pytest.mark.parametrize("shape", [(B,), (B, 2, 3, 3)])
def test_scalar_and_image_states_per_row(shape):
    y0 = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = _times()
    ys = pob.odeint(_linear(K, torch.float64), y0, t, rtol=1e-9, atol=1e-11)
    assert ys.shape == (4, *shape)
    _assert_rows_are_single_solves(ys, y0, t, lambda b: _linear(K[b], torch.float64), 1e-12, rtol=1e-9,
                                   atol=1e-11)


def test_one_row_batch_both_forms():
    f = _linear(K[:1], torch.float64)
    y0 = torch.ones(1, 2, dtype=torch.float64)
    t = _times()[:1]
    single = pob.odeint(_linear(K[0], torch.float64), y0[0], t[0])
    torch.testing.assert_close(pob.odeint(f, y0, t)[:, 0], single, rtol=1e-12, atol=1e-12)
    one_d = pob.odeint(f, y0, t[0], options={"step_control": "per_sample"})
    torch.testing.assert_close(one_d[:, 0], single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "heun3"])
@pytest.mark.parametrize("reverse", [False, True])
def test_fixed_step_rows_on_their_own_grids(method, reverse):
    # 0.07 divides no row's span: each row's grid ends on its own output times.
    t = _times().flip(1) if reverse else _times()
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kw = dict(method=method, options={"step_size": 0.07})
    stats = pob.SolveStats()
    ys = pob.odeint(_linear(K, torch.float64), y0, t, stats=stats, **kw)
    _assert_rows_are_single_solves(ys, y0, t, lambda b: _linear(K[b], torch.float64), 1e-11, **kw)
    for b in range(B):  # ceil(span / 0.07) steps plus those the inner output times add
        assert int(stats.sample_steps[b]) >= torch.ceil((t[b, -1] - t[b, 0]).abs() / 0.07)
    assert len(set(stats.sample_steps.tolist())) == B  # the rows' own grids


def test_per_row_jumps_float32_state():
    jump = torch.tensor([[0.45], [0.8], [1.05]], dtype=torch.float32)
    k = K.float()

    def f(t, y):
        return -k[:, None] * y + (t[:, None] >= jump).to(y.dtype)

    y0 = torch.ones(B, 2)
    t = _times(torch.float32)
    ys = pob.odeint(f, y0, t, rtol=1e-5, atol=1e-7, options={"jump_t": jump})
    for b in range(B):
        yb = pob.odeint(lambda tt, y, b=b: -k[b] * y + (tt >= jump[b, 0]).to(y.dtype), y0[b], t[b],
                        rtol=1e-5, atol=1e-7, options={"jump_t": jump[b]})
        torch.testing.assert_close(ys[:, b], yb, rtol=2e-6, atol=2e-6)


# --- gradients: the sums of the single solves' gradients ---------------------------------------------

@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reversed_rows_all_gradients_equal_single_solves(sensitivity, dtype):
    net, f = _mlp(dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-9
    kw = dict(rtol=rtol, atol=rtol * 1e-2)
    t = _times(dtype).flip(1).requires_grad_()
    y0 = torch.randn(B, 2, dtype=dtype, generator=torch.Generator().manual_seed(3)).requires_grad_()
    w = torch.randn(4, B, 2, dtype=dtype, generator=torch.Generator().manual_seed(4))
    ys = pob.odeint(f, y0, t, sensitivity=sensitivity, **kw)
    got = torch.autograd.grad((w * ys).sum(), [y0, t, *net.parameters()])
    want = [torch.zeros_like(g) for g in got]
    for b in range(B):
        y_b, t_b = y0.detach()[b:b + 1].requires_grad_(), t.detach()[b].clone().requires_grad_()
        g = torch.autograd.grad((w[:, b] * pob.odeint(f, y_b, t_b, **kw)[:, 0]).sum(), [y_b, t_b, *net.parameters()])
        want[0][b], want[1][b] = g[0][0], g[1]
        for acc, gi in zip(want[2:], g[2:]):
            acc += gi
    # float32: the steps may differ from the single solve's by a rounding (a discretisation error).
    tol = 1e-4 if dtype == torch.float32 else 1e-6 if sensitivity in ADJOINTS else 1e-10
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * float(e.abs().max()))


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_cnf_trace_per_row_is_the_backprop_solve(sensitivity):
    # The memory-lean methods' forward runs without a graph: the state func gets must not look
    # differentiable (requires_grad, no graph), or the CNF's trace through it is zero.
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, hidden=(8, 8)).double()
    dyn = CNFDynamics(net, "exact")
    z0 = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    lp0 = torch.zeros(B, dtype=torch.float64)
    kw = dict(rtol=1e-8, atol=1e-10, adjoint_params=tuple(net.parameters()))
    ref = pob.odeint(dyn, (z0, lp0), _times(), **kw)
    stats = pob.SolveStats()
    zs, lps = pob.odeint(dyn, (z0, lp0), _times(), sensitivity=sensitivity, stats=stats, **kw)
    ref_stats = pob.SolveStats()
    with torch.no_grad():  # a grad-requiring y0 under no_grad: the plain solve, same figures
        pob.odeint(dyn, (z0, lp0), _times(), stats=ref_stats, **kw)
    assert torch.equal(stats.sample_steps, ref_stats.sample_steps)
    assert torch.equal(zs, ref[0]) and torch.equal(lps, ref[1])
    got = torch.autograd.grad(zs[-1].sum() + lps[-1].sum(), [z0, *net.parameters()])
    want = torch.autograd.grad(ref[0][-1].sum() + ref[1][-1].sum(), [z0, *net.parameters()])
    tol = 1e-6 if sensitivity in ADJOINTS else 1e-12
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def test_ode_block_and_odeint_adjoint_per_sample():
    net, f = _mlp()
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    block = ODEBlock(f, t=torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-10,
                     options={"step_control": "per_sample"})
    out = block(y0)
    for b in range(B):
        torch.testing.assert_close(out[b], pob.odeint(f, y0[b:b + 1], block.t_span, rtol=1e-8, atol=1e-10)[-1, 0],
                                   rtol=1e-12, atol=1e-12)
    assert block.stats.sample_steps.shape == (B,)
    conv = ODEConvFunc(2, 3, time_dependent=True).double()
    x = torch.randn(B, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    xs = pob.odeint(conv, x, _times(), rtol=1e-8, atol=1e-10)
    for b in range(B):
        # A batched convolution rounds differently from a single one: the steps may differ.
        torch.testing.assert_close(xs[:, b], pob.odeint(conv, x[b:b + 1], _times()[b], rtol=1e-8, atol=1e-10)[:, 0],
                                   rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match=r"one time span for every input .* a 2-D t \(B, T\)"):
        ODEBlock(f, t=_times())
    y = y0.clone().requires_grad_()
    g_adj = torch.autograd.grad(pob.odeint_adjoint(f, y, _times(), rtol=1e-9, atol=1e-11).sum(),
                                [y, *net.parameters()])
    g_ref = torch.autograd.grad(pob.odeint(f, y, _times(), rtol=1e-9, atol=1e-11).sum(), [y, *net.parameters()])
    for a, e in zip(g_adj, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-8)


# --- second derivatives and torch.func ---------------------------------------------------------------

def test_backprop_second_derivative_is_the_single_solves():
    net, f = _mlp()
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = y0.clone().requires_grad_()
    (g,) = torch.autograd.grad((pob.odeint(f, y, _times(), rtol=1e-9, atol=1e-11) ** 2).sum(), y, create_graph=True)
    got = torch.autograd.grad((g ** 2).sum(), [y, *net.parameters()])
    want = [torch.zeros_like(a) for a in got]
    for b in range(B):
        y_b = y0[b:b + 1].clone().requires_grad_()
        (g_b,) = torch.autograd.grad((pob.odeint(f, y_b, _times()[b], rtol=1e-9, atol=1e-11) ** 2).sum(), y_b,
                                     create_graph=True)
        h = torch.autograd.grad((g_b ** 2).sum(), [y_b, *net.parameters()])
        want[0][b] = h[0][0]
        for acc, hi in zip(want[1:], h[1:]):
            acc += hi
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sensitivity", SENSITIVITIES[1:])
def test_first_order_methods_refuse_a_second_derivative(sensitivity):
    # Their gradients are computed without a graph: differentiating them again must raise, not
    # return the part of the second derivative that happened to be recorded.
    y = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    ys = pob.odeint(_linear(K, torch.float64), y, _times(), sensitivity=sensitivity)
    (g,) = torch.autograd.grad((ys ** 2).sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match=f"sensitivity='{sensitivity}' .*first derivatives only"):
        g.sum().backward()


def test_time_gradient_refuses_a_second_derivative():
    y = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    t = _times().requires_grad_()
    (g,) = torch.autograd.grad((pob.odeint(_linear(K, torch.float64), y, t) ** 2).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives involving the times t"):
        g.sum().backward()


@pytest.mark.parametrize("transform", ["jacrev", "grad", "vmap"])
def test_torch_func_transforms_are_refused(transform):
    t = _times()

    def solve(y):
        return pob.odeint(lambda tt, s: -s, y.reshape(B, 2), t)[-1].sum()

    fn = {"jacrev": torch.func.jacrev(solve), "grad": torch.func.grad(solve),
          "vmap": torch.vmap(lambda y: solve(y).reshape(1))}[transform]
    arg = torch.ones(B * 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not run under torch.func transforms"):
        fn(arg[None] if transform == "vmap" else arg)


# --- failures per row ---------------------------------------------------------------------------------

def test_max_num_steps_of_one_row_named_or_masked():
    k = torch.tensor([0.5, 2.0, 3000.0], dtype=torch.float64)
    y0 = torch.ones(B, 1, dtype=torch.float64)
    with pytest.raises(SolverError, match=r"row 2 of the batch failed: reached max_num_steps=60"):
        pob.odeint(_linear(k, torch.float64), y0, _times(), options={"max_num_steps": 60})
    stats = pob.SolveStats()
    ys = pob.odeint(_linear(k, torch.float64), y0, _times(), stats=stats,
                    options={"max_num_steps": 60, "on_failure": "mask"})
    assert stats.sample_status.tolist() == [SAMPLE_OK, SAMPLE_OK, SAMPLE_MAX_STEPS]
    assert torch.isnan(ys[1:, 2]).all() and torch.equal(ys[0, 2], y0[2])
    _assert_rows_are_single_solves(ys, y0, _times(), lambda b: _linear(k[b], torch.float64), 1e-12, rows=(0, 1))


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", {"step_size": 0.05})])
def test_nan_mid_solve_in_one_row_named_or_masked(method, options):
    # Row 1's right-hand side turns NaN after t = 0.6, between its output times 0.52 and 0.95.
    def f(t, y):
        bad = (t > 0.6) & (torch.arange(B) == 1)
        return torch.where(bad[:, None], torch.nan, -K[:, None] * y)

    y0 = torch.ones(B, 2, dtype=torch.float64)
    with pytest.raises(SolverError, match="row 1 of the batch failed"):
        pob.odeint(f, y0, _times(), method=method, options=options)
    stats = pob.SolveStats()
    ys = pob.odeint(f, y0, _times(), method=method, stats=stats, options={**(options or {}), "on_failure": "mask"})
    assert stats.sample_status.tolist()[::2] == [SAMPLE_OK, SAMPLE_OK] and stats.sample_status[1] != SAMPLE_OK
    assert torch.isfinite(ys[:2, 1]).all() and torch.isnan(ys[2:, 1]).all()
    for b in (0, 2):
        yb = pob.odeint(lambda t, y, b=b: -K[b] * y, y0[b], _times()[b], method=method, options=options)
        torch.testing.assert_close(ys[:, b], yb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_row_masked_for_nan_leaves_the_other_rows_gradients_alone(sensitivity):
    # backprop/checkpointed: the failing row's rejected attempts (NaN stages, a zero cotangent) stay
    # in the graph, and must not reach func's parameter gradients as 0 * NaN. The adjoints' sweeps
    # leave the row out of the intervals past its failure.
    net, f = _mlp()

    def g(t, y):
        return torch.where(((t > 0.5) & (torch.arange(B) == 1))[:, None], torch.nan, f(t, y))

    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    stats = pob.SolveStats()
    ys = pob.odeint(g, y0, _times(), rtol=1e-8, atol=1e-10, sensitivity=sensitivity, stats=stats,
                    options={"on_failure": "mask"})
    ok = stats.sample_status == SAMPLE_OK
    assert ok.tolist() == [True, False, True]
    got = torch.autograd.grad((ys[:, ok] ** 2).sum(), list(net.parameters()))
    want = [torch.zeros_like(p) for p in net.parameters()]
    for b in (0, 2):
        gb = torch.autograd.grad((pob.odeint(f, y0[b:b + 1], _times()[b], rtol=1e-8, atol=1e-10) ** 2).sum(),
                                 list(net.parameters()))
        for acc, gi in zip(want, gb):
            acc += gi
    tol = 1e-5 if sensitivity in ADJOINTS else 1e-10
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * float(e.abs().max()))


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve"])
def test_masked_nan_row_stand_in_state_keeps_a_dividing_field_finite(sensitivity):
    # The failing row's non-finite stage states reach func as a stand-in state; a 0 there would
    # make -w / y infinite, and 0 * inf NaN in dL/dw.
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.where(((t > 0.5) & (torch.arange(B) == 1))[:, None], torch.nan, -w / y)

    y0 = torch.full((B, 2), 3.0, dtype=torch.float64)
    stats = pob.SolveStats()
    ys = pob.odeint(f, y0, _times(), sensitivity=sensitivity, stats=stats, options={"on_failure": "mask"})
    ok = stats.sample_status == SAMPLE_OK
    (got,) = torch.autograd.grad((ys[:, ok] ** 2).sum(), [w])
    want = sum(torch.autograd.grad((pob.odeint(lambda t, y: -w / y, y0[b], _times()[b]) ** 2).sum(), [w])[0]
               for b in (0, 2))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("sensitivity", ["backprop", "interpolating"])
def test_masked_row_leaves_a_shared_t_gradient_alone(sensitivity):
    # A 1-D t's gradient sums the rows': the failed row's NaN outputs must not make it NaN.
    def f(t, y):
        return torch.where(((t > 0.5) & (torch.arange(B) == 1))[:, None], torch.nan, -K[:, None] * y * t[:, None])

    y0 = torch.ones(B, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 4, dtype=torch.float64, requires_grad=True)
    stats = pob.SolveStats()
    ys = pob.odeint(f, y0, t, rtol=1e-9, atol=1e-11, sensitivity=sensitivity, stats=stats,
                    options={"step_control": "per_sample", "on_failure": "mask"})
    ok = stats.sample_status == SAMPLE_OK
    (got,) = torch.autograd.grad((ys[:, ok] ** 2).sum(), [t])
    want = sum(torch.autograd.grad((pob.odeint(lambda tt, y, b=b: -K[b] * y * tt, y0[b], t, rtol=1e-9,
                                               atol=1e-11) ** 2).sum(), [t])[0] for b in (0, 2))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_masked_nan_row_checkpointed_equals_backprop_bit_for_bit():
    # The forward of checkpointed records no graph (func sees the NaN stages as they are), its
    # replay does (func sees them zeroed, the result NaN): the finite rows are the same bits.
    net, f = _mlp()

    def g(t, y):
        return torch.where(((t > 0.5) & (torch.arange(B) == 1))[:, None], torch.nan, f(t, y))

    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10), requires_grad=True)
    out = []
    for sensitivity in ("backprop", "checkpointed"):
        stats = pob.SolveStats()
        ys = pob.odeint(g, y0, _times(), rtol=1e-6, atol=1e-8, sensitivity=sensitivity, stats=stats,
                        options={"on_failure": "mask"})
        ok = stats.sample_status == SAMPLE_OK
        out.append([ys.detach().nan_to_num(), stats.sample_steps, stats.sample_status,
                    *torch.autograd.grad((ys[:, ok] ** 2).sum() + ys[0, ~ok].sum(), [y0, *net.parameters()])])
    for a, e in zip(*out):
        assert torch.equal(a, e)


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_row_masked_at_max_num_steps_leaves_the_others_gradients_alone(sensitivity):
    net, f = _mlp()
    k = torch.tensor([1.0, 1.0, 3000.0], dtype=torch.float64)

    def g(t, y):  # row 2 is stiff: it runs out of steps at finite values
        return f(t, y) - k[:, None] * y

    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    stats = pob.SolveStats()
    kw = dict(rtol=1e-8, atol=1e-10)
    ys = pob.odeint(g, y0, _times(), sensitivity=sensitivity, stats=stats,
                    options={"on_failure": "mask", "max_num_steps": 200}, **kw)
    assert stats.sample_status.tolist() == [SAMPLE_OK, SAMPLE_OK, SAMPLE_MAX_STEPS]
    got = torch.autograd.grad((ys[:, :2] ** 2).sum(), list(net.parameters()))
    want = [torch.zeros_like(p) for p in net.parameters()]
    for b in (0, 1):
        yb = pob.odeint(lambda t, y, b=b: f(t, y) - k[b] * y, y0[b:b + 1], _times()[b], **kw)
        for acc, gi in zip(want, torch.autograd.grad((yb ** 2).sum(), list(net.parameters()))):
            acc += gi
    tol = 1e-5 if sensitivity in ADJOINTS else 1e-10
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * float(e.abs().max()))


# --- what is refused, loudly ---------------------------------------------------------------------------

@pytest.mark.parametrize("y0, t, kwargs, match", [
    (torch.ones(B, 2), torch.arange(4).expand(B, -1), {}, "floating-point times"),
    (torch.ones(B, 2), torch.arange(4), {"options": {"step_control": "per_sample"}}, "floating-point times"),
    (torch.ones(B, 2), _times().float()[:2], {}, "t has 2 rows but y0 has batch size 3"),
    (torch.ones(B, 2), _times().float()[:, :1], {}, r"per-sample t of shape \(B, T\) needs T >= 2"),
    (torch.ones(B, 2), torch.tensor([[0.0, 0.5, 0.5, 1.0]]).expand(B, -1), {}, "strictly monotone"),
    (torch.ones(B, 2), _times().float(), {"rtol": torch.full((B, 2), 1e-6)}, "per-component tolerances"),
    (torch.ones(B, 2), _times().float(), {"method": "rk4", "options": {"grid": torch.zeros(B, 5)}},
     r"options\['grid'\] must be a 1-D"),
    ((torch.ones(B, 2), torch.ones(B + 1)), _times().float(), {}, "same leading"),
])
def test_bad_inputs_are_named(y0, t, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pob.odeint(lambda tt, y: y, y0, t, **kwargs)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_func_of_the_wrong_dtype_is_named(method):
    # A float64 tensor in a float32 solve: named at the first evaluation, as in joint mode.
    with pytest.raises(ValueError, match="func returned dtype torch.float64 for a state of dtype torch.float32"):
        pob.odeint(lambda t, y: -K[:, None] * y, torch.ones(B, 2), _times().float(), method=method)
    with pytest.raises(ValueError, match=r"dtype=y\[1\].dtype"):
        pob.odeint(lambda t, y: (-y[0], -K * y[1]), (torch.ones(B, 2), torch.ones(B)), _times().float())


def test_torchdiffeq_facade_keeps_torchdiffeq_semantics():
    from pyode_bridge import torchdiffeq as tdq
    y0 = torch.ones(B, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="1-D"):
        tdq.odeint_adjoint(lambda t, y: -y, y0, _times())
    # torchdiffeq knows no step_control: dropped with its "Unexpected arguments" warning, solved jointly.
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        ys = tdq.odeint(lambda t, y: -y * t, y0, _times()[0], options={"step_control": "per_sample"})
    assert torch.equal(ys, tdq.odeint(lambda t, y: -y * t, y0, _times()[0]))


def test_min_step_rounding_one_ulp_above_it_is_still_accepted_per_row():
    # From t=0.6, t + 0.5 - t is one ulp above 0.5: the row's step is still a min_step step (it was
    # rejected at that size until max_num_steps), and the row equals its single solve.
    def f(t, y):
        return -50 * y * torch.sin(30 * t.reshape(-1, *([1] * (y.dim() - 1))))

    t = torch.tensor([[0.6, 3.0], [0.0, 1.0]], dtype=torch.float64)
    y0 = torch.ones(2, 2, dtype=torch.float64)
    opts = {"min_step": 0.5, "max_num_steps": 50}
    ys = pob.odeint(f, y0, t, method="dopri5", options=opts)
    for b in range(2):
        single = pob.odeint(f, y0[b], t[b], method="dopri5", options=opts)
        assert torch.equal(ys[:, b], single)
