"""Per-sample events (issue 18): every row's event time and state against the joint search on that
sample alone (and closed forms), per-row starts, reverse time, tuple states, failures per row
(mask/raise), an event at t0, the checks of event_fn's output, and the gradients (y0, t0, func's
and event_fn's parameters) against the sums of the single solves' gradients."""
import math

import pytest
import torch

import pyode_bridge as pob
from pyode_bridge.errors import SolverError
from pyode_bridge.solvers.per_sample import SAMPLE_MAX_STEPS, SAMPLE_NONFINITE, SAMPLE_OK

D64 = torch.float64
G = torch.tensor([1.0, 2.0, 5.0, 9.81], dtype=D64)
PER_SAMPLE = {"step_control": "per_sample"}


def _ball(g):
    """A falling ball ``y = (height, velocity)`` under gravity ``g`` per row (0-d or ``(B,)`` t)."""
    def f(t, y):
        return torch.stack([y[..., 1], -g.expand(y.shape[:-1])], -1)
    return f


def _single_event(func_b, y0_b, t0_b, event_fn, **kw):
    """Sample b on its own: the joint search on a batch of one row."""
    t_e, sol = pob.odeint_event(func_b, y0_b[None], t0_b, event_fn=event_fn, **kw)
    return t_e, sol[:, 0]


# adaptive_heun: cubic Hermite dense output (no continuous extension of its own).
@pytest.mark.parametrize("method, rtol", [("dopri5", 1e-8), ("tsit5", 1e-8), ("bosh3", 1e-8), ("dopri8", 1e-8),
                                          ("adaptive_heun", 1e-5)])
def test_ball_rows_match_single_solves_and_the_closed_form(method, rtol):
    y0 = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 3.0], [10.0, -2.0]], dtype=D64)
    stats = pob.SolveStats()
    kw = dict(rtol=rtol, atol=rtol * 1e-2, method=method)
    t_e, sol = pob.odeint_event(_ball(G), y0, 0.0, event_fn=lambda t, y: y[:, 0], options=PER_SAMPLE,
                                stats=stats, **kw)
    assert t_e.shape == (4,) and t_e.dtype == D64 and sol.shape == (2, 4, 2)
    assert stats.sample_status.tolist() == [SAMPLE_OK] * 4
    exact = (y0[:, 1] + torch.sqrt(y0[:, 1] ** 2 + 2 * G * y0[:, 0])) / G
    torch.testing.assert_close(t_e, exact, rtol=10 * rtol, atol=0.0)
    torch.testing.assert_close(sol[0], y0)
    for b in range(4):
        one = pob.SolveStats()
        tb, sb = _single_event(_ball(G[b:b + 1]), y0[b], 0.0, lambda t, y: y[:, 0], stats=one, **kw)
        # The same steps as the single solve: the same root on the same dense output.
        torch.testing.assert_close(t_e[b], tb, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(sol[1, b], sb[1], rtol=1e-12, atol=1e-12)
        assert int(stats.sample_steps[b]) == one.steps_forward


def test_rows_with_very_different_event_times_stop_at_their_own():
    # y' = -k y from 1 until y = 1/2: t_e = ln 2 / k, from 0.007 to 69 (many doubled horizons).
    k = torch.tensor([100.0, 3.0, 0.2, 0.01], dtype=D64)
    y0 = torch.ones(4, 1, dtype=D64)
    t = torch.tensor([[0.0, 1.0]] * 4, dtype=D64)
    stats = pob.SolveStats()
    t_e, sol = pob.odeint(lambda t, y: -k[:, None] * y, y0, t, event_fn=lambda t, y: y[:, 0] - 0.5,
                          rtol=1e-9, atol=1e-12, stats=stats)
    torch.testing.assert_close(t_e, math.log(2.0) / k, rtol=1e-8, atol=0.0)
    torch.testing.assert_close(sol[1, :, 0], torch.full((4,), 0.5, dtype=D64), rtol=0.0, atol=1e-12)
    for b in range(4):
        tb, sb = _single_event(lambda t, y, b=b: -k[b] * y, y0[b], 0.0, lambda t, y: y[:, 0] - 0.5,
                               rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(t_e[b], tb, rtol=1e-12, atol=0.0)
    # A row stops stepping at its event: the fast row took few steps, not the slow row's.
    assert stats.sample_steps[0] < stats.sample_steps[-1]
    assert stats.steps_forward >= int(stats.sample_steps.max())


def test_tuple_state_per_row_t0_and_time_dependent_field():
    w = torch.tensor([1.0, 2.0, 0.5], dtype=D64)
    t0 = torch.tensor([0.0, 0.3, -1.0], dtype=D64)

    def f(t, state):
        z, s = state
        dz = torch.stack([z[..., 1], -(w ** 2).expand(z.shape[:-1]) * z[..., 0]], -1)
        return dz, torch.cos(t)[..., None] * z[..., :1]

    z0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=D64)
    s0 = torch.zeros(3, 1, dtype=D64)

    def event(t, state):  # z's first component crosses -0.25, or s reaches 2 (several components)
        return torch.stack([state[0][..., 0] + 0.25, state[1][..., 0] - 2.0], -1)

    t_e, (zs, ss) = pob.odeint_event(f, (z0, s0), t0, event_fn=event, rtol=1e-9, atol=1e-11)
    assert t_e.shape == (3,) and zs.shape == (2, 3, 2) and ss.shape == (2, 3, 1)
    for b in range(3):
        def fb(t, state, b=b):
            z, s = state
            return torch.stack([z[..., 1], -w[b] ** 2 * z[..., 0]], -1), torch.cos(t) * z[..., :1]
        tb, (zb, sb) = pob.odeint_event(fb, (z0[b:b + 1], s0[b:b + 1]), t0[b], event_fn=event, rtol=1e-9,
                                        atol=1e-11)
        torch.testing.assert_close(t_e[b], tb, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(zs[1, b], zb[1, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ss[1, b], sb[1, 0], rtol=1e-10, atol=1e-12)
        assert t_e[b] > t0[b]


def test_reverse_time_rows():
    y0 = torch.tensor([[1.0, 0.0], [2.0, -1.0], [0.3, 0.0]], dtype=D64)
    g = G[:3]
    t0 = torch.tensor([1.0, 0.0, 2.0], dtype=D64)
    t_e, sol = pob.odeint_event(_ball(g), y0, t0, event_fn=lambda t, y: y[:, 0], reverse_time=True,
                                rtol=1e-9, atol=1e-11)
    # Backwards: the ball came up from the ground at t0 - (-v + sqrt(v^2 + 2 g h)) / g.
    exact = t0 - (-y0[:, 1] + torch.sqrt(y0[:, 1] ** 2 + 2 * g * y0[:, 0])) / g
    torch.testing.assert_close(t_e, exact, rtol=1e-9, atol=1e-11)
    for b in range(3):
        tb, _ = _single_event(_ball(g[b:b + 1]), y0[b], t0[b], lambda t, y: y[:, 0], reverse_time=True,
                              rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(t_e[b], tb, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve"])
def test_event_at_t0_is_there_and_its_gradient_is_the_single_solves(sensitivity):
    def f(g):  # gravity growing with t: dL/dt0 sees the field's time dependence
        return lambda t, y: torch.stack([y[:, 1], -g.expand(y.shape[0]) * (1 + 0.1 * t.expand(y.shape[0]))], 1)

    g = G[:2]
    y0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D64, requires_grad=True)  # row 0 starts on the surface
    t0 = torch.tensor([0.5, -0.2], dtype=D64, requires_grad=True)
    w = torch.tensor([1.0, 2.0], dtype=D64)
    kw = dict(event_fn=lambda t, y: y[:, 0], sensitivity=sensitivity, rtol=1e-10, atol=1e-12)
    stats = pob.SolveStats()
    t_e, sol = pob.odeint_event(f(g), y0, t0, stats=stats, **kw)
    assert float(t_e[0].detach()) == 0.5 and torch.equal(sol[1, 0], y0[0])
    assert int(stats.sample_steps[0]) == 0
    grads = torch.autograd.grad((w * t_e).sum() + sol[1].sum(), [y0, t0])
    single = [torch.zeros_like(y0), torch.zeros_like(t0)]
    for b in range(2):
        t_b, sol_b = pob.odeint_event(f(g[b:b + 1]), y0[b:b + 1], t0[b], **kw)
        for acc, gr in zip(single, torch.autograd.grad(w[b] * t_b + sol_b[1].sum(), [y0, t0])):
            acc += gr
    for got, want in zip(grads, single):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _no_event_rows(on_failure):
    # Row 2's event (y = 2 on a decaying y) never comes; row 1's field is NaN.
    k = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=D64)
    level = torch.tensor([0.5, 0.5, 2.0, 0.5], dtype=D64)

    def f(t, y):
        out = -k[:, None] * y
        return torch.cat([out[:1], out[1:2] * math.nan, out[2:]])

    y0 = torch.ones(4, 1, dtype=D64, requires_grad=True)
    stats = pob.SolveStats()
    out = pob.odeint_event(f, y0, 0.0, event_fn=lambda t, y: y[:, 0] - level, stats=stats,
                           options={"step_control": "per_sample", "on_failure": on_failure, "max_num_steps": 200})
    return out, stats, y0, k


def test_mask_gives_failed_rows_nan_and_the_others_their_events():
    (t_e, sol), stats, y0, k = _no_event_rows("mask")
    assert stats.sample_status.tolist() == [SAMPLE_OK, SAMPLE_NONFINITE, SAMPLE_MAX_STEPS, SAMPLE_OK]
    assert t_e[1:3].isnan().all() and sol[1, 1:3].isnan().all()
    ok = torch.tensor([0, 3])
    torch.testing.assert_close(t_e[ok], math.log(2.0) / k[ok], rtol=1e-6, atol=0.0)
    # The good rows' gradients are right and the row without an event gets none. (Row 1's is NaN:
    # its func is NaN, and autograd's zero cotangent times NaN is NaN.)
    (g,) = torch.autograd.grad(t_e[ok].sum(), y0)
    keep = [0, 2, 3]
    torch.testing.assert_close(g[keep, 0], (torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D64) / k)[keep], rtol=1e-6,
                               atol=0.0)


def test_raise_names_the_failed_rows():
    with pytest.raises(SolverError, match=r"row\(s\) \[1, 2\] of the batch failed"):
        _no_event_rows("raise")


@pytest.mark.parametrize("event_fn, match", [
    (lambda t, y: y.sum(), r"shape \(B,\) or \(B, K...\) with B=3"),
    (lambda t, y: y[:2, 0], r"returned shape \(2,\)"),
    (lambda t, y: "no", "must return a tensor"),
])
def test_bad_event_fn_output_is_named(event_fn, match):
    with pytest.raises(ValueError, match=match):
        pob.odeint_event(lambda t, y: -y, torch.ones(3, 2, dtype=D64), torch.zeros(3, dtype=D64),
                         event_fn=event_fn)


@pytest.mark.parametrize("method", ["rk4", "midpoint"])
def test_fixed_steps_rows_match_single_solves(method):
    # Each row on its own grid t0[b] + k h (Hermite dense output), as the joint search on the sample.
    y0 = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 3.0]], dtype=D64)
    t0 = torch.tensor([0.0, 0.13, -0.4], dtype=D64)
    kw = dict(method=method, options={"step_size": 0.05})
    t_e, sol = pob.odeint_event(_ball(G[:3]), y0, t0, event_fn=lambda t, y: y[:, 0] - 0.1, **kw)
    for b in range(3):
        tb, sb = _single_event(_ball(G[b:b + 1]), y0[b], t0[b], lambda t, y: y[:, 0] - 0.1, **kw)
        torch.testing.assert_close(t_e[b], tb, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(sol[1, b], sb[1], rtol=1e-12, atol=1e-12)


def test_what_per_sample_events_refuse_is_named():
    y0 = torch.ones(3, 1, dtype=D64)
    with pytest.raises(ValueError, match="step_size"):
        pob.odeint_event(lambda t, y: -y, y0, torch.zeros(3, dtype=D64), event_fn=lambda t, y: y[:, 0] - 0.5,
                         method="rk4")
    with pytest.raises(ValueError, match="exactly 2 times per row"):
        pob.odeint(lambda t, y: -y, y0, torch.tensor([[0.0, 1.0, 2.0]] * 3, dtype=D64),
                   event_fn=lambda t, y: y[:, 0] - 0.5)


class _Field(torch.nn.Module):
    """A small MLP field of ``(y, t)``, row by row (0-d or ``(B,)`` t)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()

    def forward(self, t, y):  # a ball falling through a small learned force
        fall = torch.stack([y[:, 1], -torch.ones_like(y[:, 1])], 1)
        return fall + 0.3 * self.net(torch.cat([y, t.expand(y.shape[0])[:, None]], 1))


def _grads(sensitivity, batched):
    """``dL/d(y0, t0, net params, level)`` of ``L = sum_b (w_b t_e_b + v_b . y_e_b)``: the batch in
    per-sample mode, or the sum over the single solves."""
    func = _Field()
    level = torch.tensor(-0.4, dtype=D64, requires_grad=True)
    y0 = torch.tensor([[0.3, 0.5], [0.0, 1.0], [0.6, -0.2]], dtype=D64, requires_grad=True)
    t0 = torch.tensor([0.0, 0.2, -0.3], dtype=D64, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=D64)
    v = torch.tensor([[0.3, -1.0], [1.0, 0.2], [-0.5, 0.7]], dtype=D64)
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    kw = dict(event_fn=event, rtol=1e-10, atol=1e-12, sensitivity=sensitivity,
              adjoint_params=list(func.parameters()))
    if batched:
        t_e, sol = pob.odeint_event(func, y0, t0, **kw)
        loss = (w * t_e).sum() + (v * sol[1]).sum()
    else:
        loss = 0.0
        for b in range(3):
            t_e, sol = pob.odeint_event(func, y0[b:b + 1], t0[b], **kw)
            loss = loss + w[b] * t_e + (v[b] * sol[1, 0]).sum()
    return torch.autograd.grad(loss, [y0, t0, level, *func.parameters()])


@pytest.mark.parametrize("sensitivity, tol", [("backprop", 1e-9), ("checkpointed", 1e-9), ("backsolve", 1e-6),
                                              ("interpolating", 1e-6), ("interpolated", 1e-6)])
def test_gradients_are_the_sums_of_the_single_solves(sensitivity, tol):
    batched, single = _grads(sensitivity, True), _grads(sensitivity, False)
    for gb, gs in zip(batched, single):
        torch.testing.assert_close(gb, gs, rtol=tol, atol=tol)


def test_backprop_gradient_matches_finite_differences():
    g = torch.tensor([1.0, 3.0], dtype=D64)
    y0 = torch.tensor([[1.0, 0.5], [2.0, 0.0]], dtype=D64, requires_grad=True)
    t_e, sol = pob.odeint_event(_ball(g), y0, 0.0, event_fn=lambda t, y: y[:, 0] - 0.25 * y[:, 1] ** 2,
                                options=PER_SAMPLE, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(t_e.sum() + sol[1, :, 1].sum(), y0)
    eps = 1e-6
    for b in range(2):
        for i in range(2):
            d = torch.zeros_like(y0)
            d[b, i] = eps
            vals = []
            for s in (1.0, -1.0):
                te_s, sol_s = pob.odeint_event(_ball(g), (y0 + s * d).detach(), 0.0, options=PER_SAMPLE,
                                               event_fn=lambda t, y: y[:, 0] - 0.25 * y[:, 1] ** 2,
                                               rtol=1e-10, atol=1e-12)
                vals.append(float(te_s.sum() + sol_s[1, :, 1].sum()))
            assert abs((vals[0] - vals[1]) / (2 * eps) - float(grad[b, i])) < 1e-5


def test_tangential_row_raises_at_backward_naming_it():
    c = torch.tensor([0.5, 0.5, 0.5], dtype=D64)
    y0 = torch.ones(3, 1, dtype=D64, requires_grad=True)

    def event(t, y):  # row 1 crosses with zero slope: (y - c)^3
        d = y[:, 0] - c
        return torch.where(torch.arange(3) == 1, d ** 3, d)

    t_e, _ = pob.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=event, options=PER_SAMPLE, rtol=1e-9,
                              atol=1e-12)
    torch.testing.assert_close(t_e, torch.full((3,), math.log(2.0), dtype=D64), rtol=1e-6, atol=0.0)
    (g,) = torch.autograd.grad(t_e[[0, 2]].sum(), y0, retain_graph=True)  # row 1 not reached: fine
    torch.testing.assert_close(g[:, 0], torch.tensor([1.0, 0.0, 1.0], dtype=D64), rtol=1e-6, atol=0.0)
    with pytest.raises(SolverError, match=r"row\(s\) \[1\] of the batch: the event .* is tangential"):
        torch.autograd.grad(t_e.sum(), y0)


def test_shared_t0_float32_and_its_gradient():
    # A 0-d t0 shared by the rows: event_t in t0's dtype, dL/dt0 the sum over the rows.
    g = G[:3].float()
    y0 = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 0.0]])
    t0 = torch.tensor(0.5, requires_grad=True)
    t_e, sol = pob.odeint_event(_ball(g), y0, t0, event_fn=lambda t, y: y[:, 0], options=PER_SAMPLE)
    assert t_e.dtype == torch.float32 and sol.dtype == torch.float32
    exact = 0.5 + (y0[:, 1] + torch.sqrt(y0[:, 1] ** 2 + 2 * g * y0[:, 0])) / g
    torch.testing.assert_close(t_e, exact, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(t_e.sum(), t0)
    torch.testing.assert_close(grad, torch.tensor(3.0), rtol=1e-4, atol=1e-5)  # each t_e moves with t0


def test_two_roots_in_one_step_and_a_touch_per_row():
    # y' = 0 takes long steps; event_fn (t - c)^2 - d^2 has two roots c -+ d close together inside
    # one step (the first is the event), and touches zero at c where d = 0 (an event, no gradient).
    c = torch.tensor([0.5, 0.61, 0.77, 0.3], dtype=D64)
    d = torch.tensor([0.01, 1e-4, 0.0, 0.05], dtype=D64)
    event = lambda t, y: (t - c) ** 2 - d ** 2 + 0.0 * y[:, 0]  # noqa: E731
    t_e, _ = pob.odeint_event(lambda t, y: torch.zeros_like(y), torch.ones(4, 1, dtype=D64), 0.0,
                              event_fn=event, options=PER_SAMPLE)
    # The touch is found to the square root of round-off (where (t - c)^2 is below it).
    torch.testing.assert_close(t_e, c - d, rtol=0.0, atol=1e-7)
    torch.testing.assert_close(t_e[d > 0], (c - d)[d > 0], rtol=0.0, atol=1e-12)
    for b in range(4):
        tb, _ = _single_event(lambda t, y: torch.zeros_like(y), torch.ones(1, dtype=D64), 0.0,
                              lambda t, y, b=b: (t - c[b]) ** 2 - d[b] ** 2 + 0.0 * y[:, 0])
        assert float(tb) == float(t_e[b])
