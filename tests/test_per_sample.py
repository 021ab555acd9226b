"""Per-sample solving (issue 18): each batch row against its own single solve, per-row failure,
gradients (backprop, checkpointed bit for bit, the adjoints) against the sum of single solves'
gradients, the adjoints' guards per row against the single solves' figures."""
from contextlib import nullcontext

import pytest
import torch

import pyode_bridge as pob
from pyode_bridge.errors import SolverError
from pyode_bridge.solvers.per_sample import SAMPLE_MAX_STEPS, SAMPLE_NONFINITE, SAMPLE_OK

B = 4
K = torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=torch.float64)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()


def _field(net):
    """``f(t, y)`` of a row batch ``y (B, 2)`` with ``t`` 0-d or ``(B,)``."""
    def f(t, y):
        return net(torch.cat([y, t.expand(y.shape[0]).unsqueeze(1)], 1))
    return f


def _times():
    return torch.stack([torch.linspace(0.1 * b, 1 + 0.5 * b, 5, dtype=torch.float64) for b in range(B)])


def _single(func, y0_b, t_b, **kw):
    """Sample b on its own: a batch of one row."""
    return pob.odeint(func, y0_b[None], t_b, **kw)[:, 0]


@pytest.mark.parametrize("method, options, tol", [
    ("dopri5", None, 1e-8), ("tsit5", None, 1e-8), ("bosh3", None, 1e-7), ("dopri8", None, 1e-8),
    ("adaptive_heun", None, 1e-5), ("rk4", {"step_size": 0.1}, 0.0), ("midpoint", None, 0.0)])
def test_rows_match_single_solves(method, options, tol):
    f = lambda t, y: -K[:, None] * y + torch.sin(t)[:, None]  # noqa: E731
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stats = pob.SolveStats()
    rtol = tol or 1e-7
    ys = pob.odeint(f, y0, _times(), method=method, options=options, rtol=rtol, atol=rtol * 1e-2, stats=stats)
    assert ys.shape == (5, B, 2)
    assert stats.sample_status.tolist() == [SAMPLE_OK] * B
    for b in range(B):
        one = pob.SolveStats()
        yb = pob.odeint(lambda t, y, b=b: -K[b] * y + torch.sin(t), y0[b], _times()[b], method=method,
                        options=options, rtol=rtol, atol=rtol * 1e-2, stats=one)
        # Within the tolerance of the single solve (here: the same steps, so to round-off).
        torch.testing.assert_close(ys[:, b], yb, rtol=1e-12, atol=1e-12)
        assert int(stats.sample_steps[b]) == one.steps_forward
    # Stiffer rows take more steps: each row its own control.
    if tol:
        assert stats.sample_steps.tolist() == sorted(stats.sample_steps.tolist())
        assert stats.sample_steps[0] < stats.sample_steps[-1]


def test_identical_rows_are_identical_and_equal_the_joint_row():
    net = _net()
    y0 = torch.randn(1, 2, dtype=torch.float64).expand(B, 2).contiguous()
    t = torch.linspace(0, 2, 7, dtype=torch.float64)
    ys = pob.odeint(_field(net), y0, t, options={"step_control": "per_sample"})
    for b in range(1, B):
        assert torch.equal(ys[:, b], ys[:, 0])
    torch.testing.assert_close(ys[:, 0], pob.odeint(_field(net), y0[:1], t)[:, 0], rtol=1e-6, atol=1e-8)


def test_one_d_t_per_sample_control_gives_rows_their_own_steps():
    f = lambda t, y: -K[:, None] * y  # noqa: E731
    y0 = torch.ones(B, 3, dtype=torch.float64)
    t = torch.linspace(0, 3, 4, dtype=torch.float64)
    stats = pob.SolveStats()
    ys = pob.odeint(f, y0, t, options={"step_control": "per_sample"}, stats=stats)
    torch.testing.assert_close(ys, torch.exp(-K[None, :, None] * t[:, None, None]).expand(4, B, 3),
                               rtol=1e-5, atol=1e-7)
    assert len(set(stats.sample_steps.tolist())) == B
    joint = pob.SolveStats()
    pob.odeint(f, y0, t, stats=joint)
    assert stats.sample_steps[0] * 3 < joint.steps_forward  # the easy row does not pay the stiff one's pace


def test_tuple_state_parts_are_controlled_per_row():
    net = _net()
    f = _field(net)

    def g(t, s):
        z, logp = s
        return f(t, z), -(z ** 2).sum(1)

    z0 = torch.randn(B, 2, dtype=torch.float64)
    t = _times()
    zs, lps = pob.odeint(g, (z0, torch.zeros(B, dtype=torch.float64)), t, rtol=1e-8, atol=1e-10)
    assert zs.shape == (5, B, 2) and lps.shape == (5, B)
    for b in range(B):
        zb, lb = pob.odeint(lambda tt, s: (f(tt, s[0][None])[0], -(s[0] ** 2).sum()),
                            (z0[b], torch.zeros((), dtype=torch.float64)), t[b], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(zs[:, b], zb, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(lps[:, b], lb, rtol=1e-7, atol=1e-9)


def _blowup(t, y):
    """Row 1 blows up in finite time (y' = y^2 from 1 at t = 1); the others decay."""
    rate = torch.tensor([-1.0, 1.0, -2.0, -0.5], dtype=y.dtype)[:, None]
    return torch.where(rate > 0, y * y, rate * y)


def test_failure_raise_names_the_row():
    with pytest.raises(SolverError, match="row 1 of the batch failed: step size underflow"):
        pob.odeint(_blowup, torch.ones(B, 1, dtype=torch.float64), torch.linspace(0, 2, 5, dtype=torch.float64),
                   options={"step_control": "per_sample"})


def test_failure_mask_fills_the_row_with_nan_and_the_others_finish():
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    stats = pob.SolveStats()
    ys = pob.odeint(_blowup, torch.ones(B, 1, dtype=torch.float64), t, stats=stats,
                    options={"step_control": "per_sample", "on_failure": "mask"})
    assert stats.sample_status.tolist() == [0, 2, 0, 0]
    assert torch.isfinite(ys[:3, 1]).all() and torch.isnan(ys[3:, 1]).all()  # fails near t = 1
    for b, rate in ((0, -1.0), (2, -2.0), (3, -0.5)):
        torch.testing.assert_close(ys[:, b, 0], torch.exp(rate * t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_nonfinite_code(method):
    def f(t, y):  # row 0: log of a negative state, NaN from the start
        return torch.cat([torch.log(-y[:1]), -y[1:]])

    stats = pob.SolveStats()
    ys = pob.odeint(f, torch.ones(B, 1, dtype=torch.float64), _times(), stats=stats, method=method,
                    options={"on_failure": "mask"})
    assert stats.sample_status.tolist() == [SAMPLE_NONFINITE, 0, 0, 0]
    assert torch.isnan(ys[1:, 0]).all() and torch.isfinite(ys[:, 1:]).all()


def test_max_num_steps_code():
    kw = dict(rtol=1e-10, atol=1e-12, options={"step_control": "per_sample", "on_failure": "mask"})
    args = (lambda t, y: -K[:, None] * y, torch.ones(B, 1, dtype=torch.float64),
            torch.tensor([0.0, 5.0], dtype=torch.float64))
    free = pob.SolveStats()
    pob.odeint(*args, stats=free, **kw)
    cap = int(free.sample_steps[-2])  # row 2 takes exactly this many attempts (none rejected here)
    capped = pob.SolveStats()
    kw["options"]["max_num_steps"] = cap
    ys = pob.odeint(*args, stats=capped, **kw)
    assert capped.sample_status.tolist() == [0, 0, 0, SAMPLE_MAX_STEPS]
    assert torch.equal(ys[:, :3], pob.odeint(*args, **{**kw, "options": {"step_control": "per_sample"}})[:, :3])
    assert torch.isnan(ys[-1, 3]).all()


ADJOINTS = ("backsolve", "interpolating", "interpolated")


@pytest.mark.parametrize("sensitivity, method, options", [
    *((s, m, o) for s in ("backprop", "checkpointed", *ADJOINTS)
      for m, o in (("dopri5", None), ("rk4", {"step_size": 0.1}))),
    # dopri8's dense stages, evaluated per row for the dense output the adjoints read z from.
    *(("interpolating", "dopri8", None), ("interpolated", "dopri8", None))])
def test_gradients_are_the_sum_of_single_solves(sensitivity, method, options):
    net = _net()
    f = _field(net)
    y0 = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    t = _times().requires_grad_()
    kw = dict(rtol=1e-8, atol=1e-10, method=method, options=options)
    ys = pob.odeint(f, y0, t, sensitivity=sensitivity, **kw)
    wrt = [y0, t, *net.parameters()]
    got = torch.autograd.grad((ys ** 2).sum(), wrt)
    want = [torch.zeros_like(w) for w in wrt]
    for b in range(B):
        t_b = t.detach()[b].clone().requires_grad_()
        y_b = pob.odeint(lambda tt, y: f(tt, y[None])[0], y0[b], t_b, **kw)
        g = torch.autograd.grad((y_b ** 2).sum(), [y0, t_b, *net.parameters()])
        want[1][b] = g[1]
        for i in (0, *range(2, len(g))):
            want[i] += g[i]
    for a, w in zip(got, want):
        # The adjoints integrate the adjoint system to the tolerance; the others differentiate the
        # single solves' own steps.
        tol = 1e-5 if sensitivity in ADJOINTS else 1e-9
        torch.testing.assert_close(a, w, rtol=tol, atol=tol * 1e-2)


def test_checkpointed_equals_backprop_bit_for_bit():
    net = _net()
    y0 = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    t = _times().requires_grad_()
    out = []
    for sensitivity in ("backprop", "checkpointed"):
        stats = pob.SolveStats()
        ys = pob.odeint(_field(net), y0, t, rtol=1e-5, atol=1e-7, sensitivity=sensitivity, stats=stats)
        out.append([ys.detach(), stats.sample_steps,
                    *torch.autograd.grad((ys ** 2).sum(), [y0, t, *net.parameters()])])
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sensitivity", ADJOINTS)
def test_adjoints_tuple_state_and_counters(sensitivity):
    net = _net()
    f = _field(net)

    def g(t, s):
        return f(t, s[0]), -(s[0] ** 2).sum(1)

    z0 = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    lp0 = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    grads = []
    for sens in ("backprop", sensitivity):
        stats = pob.SolveStats()
        zs, lps = pob.odeint(g, (z0, lp0), _times(), rtol=1e-9, atol=1e-11, sensitivity=sens, stats=stats)
        grads.append(torch.autograd.grad((zs ** 2).sum() + lps.sum(), [z0, lp0, *net.parameters()]))
    assert stats.steps_backward > 0 and stats.nfe_backward > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_backsolve_guard_names_the_unstable_rows():
    # Forward decay at rate k is growth at rate k backwards: the fast rows' reverse-solved states
    # drift (row 3 at k = 40 by far more than 0.5%), the slow ones' stay put.
    k = torch.tensor([0.5, 1.0, 3.0, 40.0], dtype=torch.float64)
    y0 = torch.ones(B, 1, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 2, 2, dtype=torch.float64)
    ys = pob.odeint(lambda t, y: -k[:, None] * y, y0, t, rtol=1e-6, atol=1e-9, sensitivity="backsolve",
                    options={"step_control": "per_sample"})
    with pytest.warns(pob.AccuracyWarning, match=r"row\(s\) \[3\] drifted"):
        ys[-1].sum().backward()
    ys = pob.odeint(lambda t, y: -k[:, None] * y, y0, t, rtol=1e-6, atol=1e-9,
                    sensitivity=pob.Backsolve(on_instability="raise"), options={"step_control": "per_sample"})
    with pytest.raises(SolverError, match="checkpointed"):
        ys[-1].sum().backward()


def test_interpolating_guard_per_row_is_the_single_solves_figure():
    # rk4 at h = 0.1 resolves the slow rows' decay; row 3's (h k = 2) is not resolved by its steps.
    k = torch.tensor([0.5, 1.0, 2.0, 20.0], dtype=torch.float64)
    kw = dict(method="rk4", options={"step_size": 0.1}, sensitivity="interpolating")
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    stats = pob.SolveStats()
    with pytest.warns(pob.AccuracyWarning, match=r"dense output of row\(s\) \[3\]"):
        pob.odeint(lambda t, y: -k[:, None] * y, torch.ones(B, 1, dtype=torch.float64, requires_grad=True), t,
                   stats=stats, **{**kw, "options": {"step_size": 0.1, "step_control": "per_sample"}})
    singles = []
    for b in range(B):
        one = pob.SolveStats()
        with pytest.warns(pob.AccuracyWarning) if b == 3 else nullcontext():
            pob.odeint(lambda t, y, b=b: -k[b] * y, torch.ones(1, dtype=torch.float64, requires_grad=True), t,
                       stats=one, **kw)
        singles.append(one.dense_output_error)
    assert stats.dense_output_error == pytest.approx(max(singles), rel=1e-9)
    assert sorted(singles)[-2] < 1e-2 < singles[3]
    with pytest.raises(SolverError, match=r"row\(s\) \[3\]"):
        pob.odeint(lambda t, y: -k[:, None] * y, torch.ones(B, 1, dtype=torch.float64, requires_grad=True), t,
                   method="rk4", options={"step_size": 0.1, "step_control": "per_sample"},
                   sensitivity=pob.Interpolating(on_inaccuracy="raise"))


def test_interpolated_guard_per_row_is_the_single_solves_figure():
    # Row 3 turns 30 times faster than the others: 8 Chebyshev nodes per interval miss its z.
    w = torch.tensor([1.0, 1.0, 1.0, 30.0], dtype=torch.float64)
    t = torch.linspace(0, 2, 3, dtype=torch.float64)
    y0 = torch.ones(B, 2, dtype=torch.float64, requires_grad=True)
    kw = dict(rtol=1e-6, atol=1e-8, sensitivity=pob.Interpolated(nodes=8))
    stats = pob.SolveStats()
    with pytest.warns(pob.AccuracyWarning, match=r"interpolant of z of row\(s\) \[3\]"):
        pob.odeint(lambda t, y: w[:, None] * y.flip(1) * torch.tensor([1.0, -1.0], dtype=y.dtype), y0, t,
                   stats=stats, options={"step_control": "per_sample"}, **kw)
    singles = []
    for b in range(B):
        one = pob.SolveStats()
        with pytest.warns(pob.AccuracyWarning) if b == 3 else nullcontext():
            pob.odeint(lambda t, y, b=b: w[b] * y.flip(0) * torch.tensor([1.0, -1.0], dtype=y.dtype), y0[b], t,
                       stats=one, **kw)
        singles.append(one.interpolation_error)
    assert stats.interpolation_error == pytest.approx(max(singles), rel=1e-6)
    assert stats.interpolation_nodes == [8, 8]
    assert sorted(singles)[-2] < pob.Interpolated().guard_factor < singles[3]


@pytest.mark.parametrize("sensitivity", ["backprop", *ADJOINTS])
def test_one_d_t_gradient_sums_over_rows(sensitivity):
    f = lambda t, y: -K[:, None] * y * t[:, None]  # noqa: E731
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    ys = pob.odeint(f, torch.ones(B, 1, dtype=torch.float64), t, rtol=1e-10, atol=1e-12,
                    options={"step_control": "per_sample"}, sensitivity=sensitivity)
    (g,) = torch.autograd.grad(ys[-1].sum(), t)
    # y_b(t) = exp(-k_b t^2 / 2): dL/dt_2 = sum_b -k_b t exp(-k_b t^2 / 2) at t = 1.
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, float((-K * torch.exp(-K / 2)).sum())],
                                               dtype=torch.float64), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sensitivity=pob.Interpolating(checkpointing=True)), r"Interpolating\(checkpointing=True\) is not"),
    (dict(method="radauIIA5"), "explicit Runge-Kutta methods"),
    (dict(method="explicit_adams"), "explicit Runge-Kutta methods"),
    (dict(options={"perturb": True}), r"does not support options \['perturb'\]"),
    (dict(event_fn=lambda t, y: y[:, 0]), "exactly 2 times per row"),
    (dict(adjoint_options={"norm": "seminorm"}), "adjoint_method/adjoint_options"),
])
def test_what_per_sample_mode_refuses_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pob.odeint(lambda t, y: -y, torch.ones(B, 1), _times().float(), **kwargs)


def test_func_of_a_scalar_t_gets_the_fix():
    with pytest.raises(ValueError, match=r"func receives t of shape \(B,\)"):
        pob.odeint(lambda t, y: float(t) * y, torch.ones(B, 1), _times().float())


def test_joint_options_spelled_out_and_torchdiffeq_refuses_2d_t():
    t = torch.linspace(0, 1, 3)
    y0 = torch.ones(B, 1)
    same = pob.odeint(lambda t, y: -y, y0, t, options={"step_control": "joint", "on_failure": "raise"})
    assert torch.equal(same, pob.odeint(lambda t, y: -y, y0, t))
    from pyode_bridge import torchdiffeq as tdq
    with pytest.raises(ValueError, match="1-D"):
        tdq.odeint(lambda t, y: -y, y0, _times().float())


# Row b's forcing switches on at JUMP[b] (a discontinuity in t), inside its interval _times()[b].
JUMP = torch.tensor([0.45, 0.8, 1.05, 1.9], dtype=torch.float64)


def _switched(t, y, k=K[:, None], jump=JUMP):
    """``-k y + [t >= jump]`` for ``t`` ``(B,)`` (per-sample) or 0-d with one row's ``k``, ``jump``."""
    return -k * y + (t >= jump).to(y.dtype).reshape(-1, 1)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("bosh3", None), ("rk4", {"step_size": 0.1})])
@pytest.mark.parametrize("shared_step_t", [False, True])
def test_per_row_stops_match_single_solves(method, options, shared_step_t):
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = _times()
    step_t = torch.tensor([0.3, 0.7], dtype=torch.float64) if shared_step_t else \
        torch.stack([t[:, 0] + 0.11, t[:, 0] + 0.37], 1)
    stats = pob.SolveStats()
    kw = dict(method=method, rtol=1e-7, atol=1e-9)
    ys = pob.odeint(_switched, y0, t, options={**(options or {}), "jump_t": JUMP[:, None], "step_t": step_t},
                    stats=stats, **kw)
    for b in range(B):
        one = pob.SolveStats()
        row_stops = step_t if shared_step_t else step_t[b]
        yb = _single(lambda tt, y, b=b: _switched(tt, y, K[b], JUMP[b]), y0[b], t[b], stats=one,
                     options={**(options or {}), "jump_t": [float(JUMP[b])], "step_t": row_stops}, **kw)
        torch.testing.assert_close(ys[:, b], yb, rtol=1e-12, atol=1e-12)
        assert int(stats.sample_steps[b]) == one.steps_forward
    # Without the jumps the steps straddle the switch and the rows differ by far more than round-off.
    if options is None:
        plain = pob.odeint(_switched, y0, t, **kw)
        assert (plain - ys).abs().max() > 1e-9


@pytest.mark.parametrize("method", ["rk4", "midpoint"])
def test_outputs_in_a_step_ending_on_a_jump_match_single_solves(method):
    # Cubic Hermite between a fixed step's ends: the end derivative of a step that ends on a row's
    # jump is the one before the jump (as the single solve's), not the switched field's after it.
    t = torch.stack([torch.stack([torch.tensor(0.0, dtype=torch.float64), j - 0.02, j + 0.03,
                                  torch.tensor(2.0, dtype=torch.float64)]) for j in JUMP])
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kw = dict(method=method, options={"step_size": 0.1})
    ys = pob.odeint(_switched, y0, t, **{**kw, "options": {"step_size": 0.1, "jump_t": JUMP[:, None]}})
    for b in range(B):
        yb = _single(lambda tt, y, b=b: _switched(tt, y, K[b], JUMP[b]), y0[b], t[b],
                     **{**kw, "options": {"step_size": 0.1, "jump_t": [float(JUMP[b])]}})
        torch.testing.assert_close(ys[:, b], yb, rtol=1e-12, atol=1e-12)


def test_per_row_stops_gradients_checkpointed_equals_backprop_and_adjoints_close():
    net = _net()
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(t, y):
        return _field(net)(t, y) + (t >= JUMP).to(y.dtype)[:, None]

    grads = {}
    for sens in ("backprop", "checkpointed", "backsolve", "interpolating"):
        net.zero_grad()
        y = y0.clone().requires_grad_(True)
        ys = pob.odeint(f, y, _times(), rtol=1e-9, atol=1e-11, sensitivity=sens,
                        options={"jump_t": JUMP[:, None]})
        (ys ** 2).sum().backward()
        grads[sens] = (ys.detach(), y.grad, *[p.grad.clone() for p in net.parameters()])
    for a, b in zip(grads["backprop"], grads["checkpointed"]):
        assert torch.equal(a, b)
    for sens in ("backsolve", "interpolating"):
        for a, b in zip(grads["backprop"][1:], grads[sens][1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # A jump not declared in jump_t: interpolated fits one Chebyshev polynomial across the kink,
    # and its guard names the rows whose output interval holds it (row 1's is an output time).
    with pytest.warns(pob.AccuracyWarning, match=r"(?s)interpolant of z of row\(s\) \[0, 2, 3\].*'jump_t'"):
        ys = pob.odeint(f, y0.clone().requires_grad_(True), _times(), rtol=1e-9, atol=1e-11,
                        sensitivity="interpolated")
        (ys ** 2).sum().backward()


def _kinked(theta, k, c, jumps):
    """``-k theta y + c [t >= jump] + sin 3t`` for ``t`` ``(B,)`` with ``k``, ``c`` ``(B, 1)`` and
    ``jumps`` ``(B, J)`` (per-sample), or 0-d with one row's ``k``, ``c`` and ``jumps`` ``(J,)``: a
    forcing switched on at each of the row's own jumps, so that ``z`` has a kink at each."""
    def f(t, y):
        on = (t.reshape(-1, 1) >= jumps.reshape(t.numel(), -1)).to(y.dtype).sum(1, keepdim=True)
        return -k * theta * y + c * on.reshape(-1, 1) + torch.sin(3 * t).reshape(-1, 1)
    return f


C = torch.tensor([1.0, -2.0, 0.7, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("case", ["own", "two_per_row", "shared", "reversed", "rk4"])
def test_interpolated_splits_each_rows_intervals_at_its_jumps(case):
    # Each row's Chebyshev intervals end at its own jumps: the gradients are the sums of the single
    # solves' (joint interpolated, which splits at jump_t), and the guard is quiet (an
    # AccuracyWarning is an error here). Rows whose jump is an output time (row 1 of JUMP), outside
    # the span, an end, or one of two in one interval get intervals of length 0 or none.
    t = _times()
    jumps = JUMP[:, None]
    kw: dict = dict(rtol=1e-9, atol=1e-11)
    if case == "two_per_row":  # row 0: both inside one interval; row 1: one outside; row 3: at t_0
        jumps = torch.tensor([[0.3, 0.45], [0.8, 9.0], [-1.0, 1.05], [0.3, 1.9]], dtype=torch.float64)
    elif case == "shared":
        jumps = torch.tensor([0.6, 1.3], dtype=torch.float64).expand(B, -1)
    elif case == "reversed":
        t = t.flip(1)
    elif case == "rk4":
        kw = dict(method="rk4", options={"step_size": 0.02}, rtol=1e-5, atol=1e-7)  # the guard vs Hermite
    theta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    t_in = t.clone().requires_grad_()
    jump_t = jumps[0] if case == "shared" else jumps
    options = {**kw.get("options", {}), "jump_t": jump_t}
    stats = pob.SolveStats()
    ys = pob.odeint(_kinked(theta, K[:, None], C[:, None], jumps), y0, t_in, sensitivity="interpolated",
                    adjoint_params=(theta,), stats=stats, **{**kw, "options": options})
    got = torch.autograd.grad((ys ** 2).sum(), [y0, t_in, theta])
    want = [torch.zeros_like(y0), torch.zeros_like(t), torch.zeros_like(theta)]
    for b in range(B):
        t_b = t[b].clone().requires_grad_()
        y_b = _single(_kinked(theta, K[b], C[b], jumps[b]), y0[b], t_b, sensitivity="interpolated",
                      adjoint_params=(theta,), **{**kw, "options": {**options, "jump_t": jumps[b].tolist()}})
        g = torch.autograd.grad((y_b ** 2).sum(), [y0, t_b, theta])
        want[0] += g[0]
        want[1][b] = g[1]
        want[2] += g[2]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-8)
    assert stats.interpolation_error < 10.0
    # One interval per column of the rows' merged times and jumps: more than the output intervals.
    assert len(stats.interpolation_nodes) > t.shape[1] - 1


def test_interpolated_jumps_outside_every_span_change_nothing():
    # Jumps that split no row's interval (outside every span) leave the intervals, the nodes and
    # the gradients as without jump_t, bit for bit.
    net = _net()
    y0 = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = []
    for options in (None, {"jump_t": torch.tensor([[-1.0, 7.0]], dtype=torch.float64).expand(B, -1)}):
        stats = pob.SolveStats()
        y = y0.clone().requires_grad_(True)
        ys = pob.odeint(_field(net), y, _times(), rtol=1e-7, atol=1e-9, sensitivity="interpolated",
                        options=options, stats=stats)
        out.append([ys.detach(), *torch.autograd.grad((ys ** 2).sum(), [y, *net.parameters()]),
                    torch.tensor(stats.interpolation_nodes)])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_per_row_stops_are_checked():
    with pytest.raises(ValueError, match=r"shape \(B, K\)"):
        pob.odeint(_switched, torch.ones(B, 2, dtype=torch.float64), _times(),
                   options={"jump_t": JUMP[:2, None]})
    with pytest.raises(ValueError, match="repeated"):
        pob.odeint(_switched, torch.ones(B, 2, dtype=torch.float64), _times(),
                   options={"jump_t": JUMP[:, None], "step_t": JUMP[:, None]})
