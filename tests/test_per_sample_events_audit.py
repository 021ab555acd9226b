"""Audit of per-sample events (issue 18): each probe compares the batch with the joint search on every
sample alone (``odeint_event`` on a batch of one row): float32, per-row ``step_t``/``jump_t``, events
at ``t0``, event times orders of magnitude apart, rows without an event or with NaN (mask/raise),
B=1, several components crossing in different rows, ``event_fn`` parameters, ``odeint_adjoint``,
the torchdiffeq facade, second derivatives, ``torch.no_grad`` and partial gradients."""
import math

import pytest
import torch

import pyode_bridge as pob
import pyode_bridge.torchdiffeq as ptd
from pyode_bridge.errors import SolverError
from pyode_bridge.solvers.per_sample import SAMPLE_MAX_STEPS, SAMPLE_NONFINITE, SAMPLE_OK

D64 = torch.float64
PER_SAMPLE = {"step_control": "per_sample"}
TIGHT = dict(rtol=1e-10, atol=1e-12)


class Drag(torch.nn.Module):
    """A ball ``(height, velocity)`` under gravity ``g[b]`` and drag ``k * v``, with a time-dependent
    push (``dL/dt0`` sees ``func``'s time dependence); ``t`` 0-d or ``(B,)``."""

    def __init__(self, g: torch.Tensor, dtype=D64):
        super().__init__()
        self.g = g.to(dtype)
        self.k = torch.nn.Parameter(torch.tensor(0.3, dtype=dtype))

    def forward(self, t, y):
        B = y.shape[0]
        push = 0.2 * torch.sin(3.0 * t).expand(B)
        return torch.stack([y[:, 1], -self.g.expand(B) - self.k * y[:, 1] + push], 1)

    def row(self, b: int) -> "Drag":
        one = Drag(self.g[b:b + 1], self.k.dtype)
        one.k = self.k  # the same parameter: its gradients add up
        return one


def _rows_vs_single(func, y0, t0, event_fn, row_event, params, *, w=None, v=None, **kw):
    """The batch's ``(t_e, y_e, grads of L)`` and the single solves' (``L = sum_b w_b t_e_b + v_b . y_e_b``;
    the single solves' gradients summed)."""
    B = y0.shape[0]
    w = torch.linspace(1.0, -1.0, B, dtype=y0.dtype) if w is None else w
    v = torch.ones_like(y0) if v is None else v
    t_e, sol = pob.odeint_event(func, y0, t0, event_fn=event_fn, **kw)
    grads = torch.autograd.grad((w * t_e).sum() + (v * sol[1]).sum(), params, allow_unused=True)
    single_t, single_y, single_g = [], [], [torch.zeros_like(p) for p in params]
    kw1 = {k: v_ for k, v_ in kw.items() if k not in ("options", "stats")}
    kw1["options"] = {k: v_ for k, v_ in (kw.get("options") or {}).items()
                      if k not in ("step_control", "on_failure", "step_t", "jump_t")}
    for b in range(B):
        opts = dict(kw1["options"])
        for name in ("step_t", "jump_t"):
            if name in (kw.get("options") or {}):
                opts[name] = kw["options"][name][b]
        t0_b = t0[b] if isinstance(t0, torch.Tensor) and t0.dim() == 1 else t0
        tb, sb = pob.odeint_event(func.row(b), y0[b:b + 1], t0_b, event_fn=row_event(b),
                                  **{**kw1, "options": opts})
        single_t.append(tb.detach())
        single_y.append(sb[1, 0].detach())
        gs = torch.autograd.grad(w[b] * tb + (v[b] * sb[1, 0]).sum(), params, allow_unused=True)
        for acc, g in zip(single_g, gs):
            if g is not None:
                acc += g
    return (t_e.detach(), sol[1].detach(), grads), (torch.stack(single_t), torch.stack(single_y), single_g)


def _assert_rows_match(batch, single, tol_t, tol_g):
    (t_e, y_e, grads), (t_s, y_s, grads_s) = batch, single
    torch.testing.assert_close(t_e, t_s.to(t_e.dtype), rtol=tol_t, atol=tol_t)
    torch.testing.assert_close(y_e, y_s.to(y_e.dtype), rtol=tol_t, atol=tol_t)
    for g, gs in zip(grads, grads_s):
        torch.testing.assert_close(torch.zeros_like(gs) if g is None else g, gs, rtol=tol_g, atol=tol_g)


G4 = torch.tensor([1.0, 2.0, 5.0, 9.81], dtype=D64)


def _setup(B=4, dtype=D64):
    func = Drag(G4[:B], dtype)
    level = torch.tensor(-0.1, dtype=dtype, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5], [2.0, -0.3], [0.4, 1.0], [3.0, 0.0]][:B], dtype=dtype, requires_grad=True)
    t0 = torch.tensor([0.0, 0.3, -0.2, 1.0][:B], dtype=dtype, requires_grad=True)
    return func, level, y0, t0


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolated", "interpolating", "checkpointed"])
def test_float32_rows_match_single_solves(sensitivity):
    func, level, y0, t0 = _setup(dtype=torch.float32)
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    batch, single = _rows_vs_single(func, y0, t0, event, lambda b: event, [y0, t0, level, func.k],
                                    sensitivity=sensitivity, rtol=1e-5, atol=1e-6)
    assert batch[0].dtype == torch.float32
    _assert_rows_match(batch, single, 1e-5, 2e-3)


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolated", "interpolating", "checkpointed"])
def test_per_row_step_t_and_jump_t_with_events(sensitivity):
    func, level, y0, t0 = _setup()
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    # Row b's stops lie inside its flight (events between 0.5 and 2.3 after t0).
    step_t = (t0.detach() + torch.tensor([0.1, 0.25, 0.05, 0.2], dtype=D64))[:, None]
    jump_t = (t0.detach() + torch.tensor([0.2, 0.5, 0.15, 0.4], dtype=D64))[:, None]
    opts = {**PER_SAMPLE, "step_t": step_t, "jump_t": jump_t}
    batch, single = _rows_vs_single(func, y0, t0, event, lambda b: event, [y0, t0, level, func.k],
                                    sensitivity=sensitivity, options=opts, **TIGHT)
    tol_g = 1e-9 if sensitivity in ("backprop", "checkpointed") else 1e-6
    _assert_rows_match(batch, single, 1e-12, tol_g)


@pytest.mark.parametrize("sensitivity", ["backprop", "interpolated", "checkpointed"])
def test_rows_at_t0_beside_rows_in_flight(sensitivity):
    # Rows 0 and 2 start on the surface (event at t0, no step); their gradients still flow (dt_e/dt0 = 1).
    func, level, y0, t0 = _setup()
    y0 = torch.tensor([[-0.1, 0.5], [2.0, -0.3], [-0.1, -1.0], [3.0, 0.0]], dtype=D64, requires_grad=True)
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    stats = pob.SolveStats()
    batch, single = _rows_vs_single(func, y0, t0, event, lambda b: event, [y0, t0, level, func.k],
                                    sensitivity=sensitivity, stats=stats, **TIGHT)
    assert torch.equal(batch[0][[0, 2]], t0.detach()[[0, 2]])
    assert stats.sample_steps[[0, 2]].tolist() == [0, 0]
    _assert_rows_match(batch, single, 1e-12, 1e-8 if sensitivity != "interpolated" else 1e-6)


@pytest.mark.parametrize("sensitivity", ["backprop", "checkpointed"])
def test_event_at_t0_on_a_component_other_than_the_first(sensitivity):
    # Row 0 starts on the surface of component 1 (height = level) while component 0 (v + 100) is far
    # from zero: its gradient is that of component 1 (it differentiated component 0, silently).
    func, level, y0, t0 = _setup()
    y0 = torch.tensor([[-0.1, 0.5], [2.0, -0.3], [0.4, 1.0], [3.0, 0.0]], dtype=D64, requires_grad=True)
    event = lambda t, y: torch.stack([y[:, 1] + 100.0, y[:, 0] - level], 1)  # noqa: E731
    batch, single = _rows_vs_single(func, y0, t0, event, lambda b: event, [y0, t0, level, func.k],
                                    sensitivity=sensitivity, **TIGHT)
    assert batch[0][0] == t0.detach()[0]
    _assert_rows_match(batch, single, 1e-12, 1e-8)


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolated"])
def test_event_times_many_orders_of_magnitude_apart(sensitivity):
    # y' = -k y from 1 to 1/2: t_e = ln 2 / k from 7e-6 to 7e3; each row matches its single solve.
    k = torch.tensor([1e5, 1.0, 1e-2, 1e-4], dtype=D64)
    y0 = torch.ones(4, 1, dtype=D64, requires_grad=True)

    class Decay(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, t, y):
            return -self.k[:, None] * y

        def row(self, b):
            return Decay(self.k[b:b + 1])

    event = lambda t, y: y[:, 0] - 0.5  # noqa: E731
    stats = pob.SolveStats()
    batch, single = _rows_vs_single(Decay(k), y0, 0.0, event, lambda b: event, [y0], stats=stats,
                                    options=PER_SAMPLE, sensitivity=sensitivity, **TIGHT)
    torch.testing.assert_close(batch[0], math.log(2.0) / k, rtol=1e-8, atol=0.0)
    _assert_rows_match(batch, single, 1e-13, 1e-12 if sensitivity == "backprop" else 1e-8)
    # t_e = ln(2 y0) / k and y_e = 1/2: dL/dy0 = w / k (w: the helper's weights).
    torch.testing.assert_close(batch[2][0][:, 0], torch.linspace(1.0, -1.0, 4, dtype=D64) / k, rtol=1e-6, atol=0.0)


def _mixed_failures(on_failure, sensitivity="backprop"):
    # Row 1 never reaches its level (y decays towards 0 > level); row 2's event_fn turns NaN at t > 0.3.
    k = torch.tensor([1.0, 1.0, 2.0, 0.5], dtype=D64)
    level = torch.tensor([0.5, -0.5, 0.5, 0.5], dtype=D64, requires_grad=True)
    y0 = torch.ones(4, 1, dtype=D64, requires_grad=True)

    def event(t, y):
        bad = torch.where((torch.arange(4) == 2) & (t > 0.3), math.nan, 0.0)
        return y[:, 0] - level + bad

    stats = pob.SolveStats()
    t_e, sol = pob.odeint_event(lambda t, y: -k[:, None] * y, y0, 0.0, event_fn=event, stats=stats,
                                sensitivity=sensitivity,
                                options={**PER_SAMPLE, "on_failure": on_failure, "max_num_steps": 100})
    return t_e, sol, stats, y0, level, k


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolated", "interpolating", "checkpointed"])
def test_mask_no_event_and_nan_event_fn_rows_others_exact_and_their_gradients_zero(sensitivity):
    t_e, sol, stats, y0, level, k = _mixed_failures("mask", sensitivity)
    assert stats.sample_status.tolist() == [SAMPLE_OK, SAMPLE_MAX_STEPS, SAMPLE_NONFINITE, SAMPLE_OK]
    assert torch.isnan(t_e[[1, 2]]).all() and torch.isnan(sol[1, [1, 2]]).all()
    ok = [0, 3]
    torch.testing.assert_close(t_e[ok], torch.log(1 / level[ok]) / k[ok], rtol=1e-6, atol=0.0)
    gy, gl = torch.autograd.grad(t_e[ok].sum() + sol[1, ok].sum(), [y0, level])
    # t_e = ln(y0 / level) / k: dt/dy0 = 1 / k, dt/dlevel = -1 / (k level); y_e = level.
    want_y = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=D64)
    want_l = torch.tensor([-2.0 + 1.0, 0.0, 0.0, -4.0 + 1.0], dtype=D64)
    torch.testing.assert_close(gy[:, 0], want_y, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gl, want_l, rtol=1e-6, atol=1e-9)


def test_raise_names_both_failed_rows():
    with pytest.raises(SolverError, match=r"row\(s\) \[1, 2\]"):
        _mixed_failures("raise")


def test_nan_in_one_rows_start_is_named():
    y0 = torch.tensor([[1.0], [math.nan], [2.0]], dtype=D64)
    with pytest.raises((ValueError, SolverError), match=r"y0 contains NaN .* index \(1, 0\)"):
        pob.odeint_event(lambda t, y: -y, y0, 0.0, event_fn=lambda t, y: y[:, 0] - 0.5, options=PER_SAMPLE)


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "checkpointed"])
def test_batch_of_one_row(sensitivity):
    func, level, y0, t0 = _setup(B=1)
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    for t0_ in (t0, t0[0]):  # a (1,) t0 with per_sample options, and a 0-d one
        batch, single = _rows_vs_single(func, y0, t0_, event, lambda b: event, [y0, t0, level, func.k],
                                        sensitivity=sensitivity, options=PER_SAMPLE, **TIGHT)
        assert batch[0].shape == (1,)
        _assert_rows_match(batch, single, 1e-13, 1e-8)


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolating"])
def test_k_components_crossing_in_different_rows_with_event_fn_parameters(sensitivity):
    # Component 0: the height reaches a per-row floor (a parameter of event_fn); component 1: the
    # velocity reaches -vmax; component 2: a timer t - t_max. Each row stops at whichever comes first.
    func, _, y0, t0 = _setup()
    floor = torch.tensor([0.95, 1.5, -5.0, -5.0], dtype=D64, requires_grad=True)
    vmax = torch.tensor([9.0, 9.0, 1.5, 9.0], dtype=D64, requires_grad=True)
    t_max = torch.tensor(1.2, dtype=D64, requires_grad=True)

    def event_rows(rows):
        return lambda t, y: torch.stack([y[:, 0] - floor[rows], y[:, 1] + vmax[rows],
                                            (t - t_max).expand(y.shape[0])], 1)

    stats = pob.SolveStats()
    batch, single = _rows_vs_single(func, y0, t0, event_rows(slice(None)), lambda b: event_rows(slice(b, b + 1)),
                                    [y0, t0, floor, vmax, t_max, func.k], sensitivity=sensitivity, stats=stats,
                                    **TIGHT)
    t_e, y_e = batch[0], batch[1]
    # Which component ended each row: row 0 the floor, row 1 the floor, row 2 the speed, row 3 the timer.
    torch.testing.assert_close(y_e[[0, 1], 0], floor.detach()[[0, 1]], rtol=0.0, atol=1e-9)
    torch.testing.assert_close(y_e[2, 1], -vmax.detach()[2], rtol=0.0, atol=1e-9)
    torch.testing.assert_close(t_e[3], t_max.detach(), rtol=0.0, atol=1e-12)
    _assert_rows_match(batch, single, 1e-12, 1e-8 if sensitivity == "backprop" else 1e-6)
    # The timer's gradient: only row 3 ends on it, dL/dt_max = w_3 + v_3 . f(t_e, y_e) (v = 1).
    with torch.no_grad():
        f3 = func.row(3)(t_e[3:], y_e[3:])
    torch.testing.assert_close(batch[2][4], -1.0 + f3.sum(), rtol=1e-9, atol=0.0)


def test_odeint_adjoint_interface_rows_match_single_solves():
    func, level, y0, t0 = _setup()
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    batch, single = _rows_vs_single(func, y0, t0, event, lambda b: event, [y0, t0, level, func.k],
                                    odeint_interface=pob.odeint_adjoint, **TIGHT)
    _assert_rows_match(batch, single, 1e-12, 1e-6)


def test_torchdiffeq_facade_keeps_a_single_t0():
    # torchdiffeq's odeint_event has no per-row starts: a (B,) t0 is refused (as torchdiffeq does,
    # naming t0 and pointing to pyode_bridge.odeint_event); a per_sample option is not taken (dropped
    # with torchdiffeq's warning, one joint solve: a 0-d event time).
    y0 = torch.tensor([[1.0], [2.0]], dtype=D64)
    event = lambda t, y: y[..., 0].prod() - 0.25  # noqa: E731
    with pytest.raises(ValueError, match=r"t0 must hold a single time .* pyode_bridge.odeint_event"):
        ptd.odeint_event(lambda t, y: -y, y0, torch.tensor([0.0, 0.1], dtype=D64), event_fn=event)
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        t_e, sol = ptd.odeint_event(lambda t, y: -y, y0, torch.tensor(0.0, dtype=D64), event_fn=event,
                                    options=PER_SAMPLE)
    assert t_e.shape == () and sol.shape == (2, 2, 1)
    torch.testing.assert_close(t_e, torch.tensor(math.log(8.0) / 2, dtype=D64), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "checkpointed"])
def test_second_derivatives_are_refused(sensitivity):
    func, level, y0, t0 = _setup()
    for t0_, match in ((t0.detach(), "first derivatives only"), (t0, "second derivatives involving the times")):
        t_e, sol = pob.odeint_event(func, y0, t0_, event_fn=lambda t, y: y[:, 0] - level, sensitivity=sensitivity)
        (g,) = torch.autograd.grad(t_e.sum() + sol[1].sum(), y0, create_graph=True)
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(g.sum(), [y0, level, func.k])


@pytest.mark.parametrize("sensitivity", ["backprop", "interpolating"])
def test_no_grad_gives_the_same_events_without_a_graph(sensitivity):
    func, level, y0, t0 = _setup()
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    t_e, sol = pob.odeint_event(func, y0, t0, event_fn=event, sensitivity=sensitivity, **TIGHT)
    with torch.no_grad():
        t_n, sol_n = pob.odeint_event(func, y0, t0, event_fn=event, sensitivity=sensitivity, **TIGHT)
    assert not t_n.requires_grad and not sol_n.requires_grad
    assert torch.equal(t_n, t_e.detach()) and torch.equal(sol_n, sol.detach())


@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolated"])
@pytest.mark.parametrize("part", ["time", "state"])
def test_gradients_through_the_event_time_only_or_the_state_only(sensitivity, part):
    func, level, y0, t0 = _setup()
    event = lambda t, y: y[:, 0] - level  # noqa: E731
    zero_w, zero_v = torch.zeros(4, dtype=D64), torch.zeros(4, 2, dtype=D64)
    weights = dict(v=zero_v) if part == "time" else dict(w=zero_w, v=torch.tensor([[0.0, 1.0]] * 4, dtype=D64))
    batch, single = _rows_vs_single(func, y0, t0, event, lambda b: event, [y0, t0, level, func.k],
                                    sensitivity=sensitivity, **weights, **TIGHT)
    _assert_rows_match(batch, single, 1e-12, 1e-9 if sensitivity == "backprop" else 1e-6)


@pytest.mark.parametrize("method", ["rk4", "euler", "midpoint"])
def test_fixed_steps_with_per_row_jump_t(method):
    # Row 2's grid 0.2 + k 0.01 passes its jump at 0.9 by an ulp: a step one float wide, whose screen
    # samples coincide (the dip search divided by their zero distance, in joint mode too).
    k = torch.tensor([1.0, 2.0, 0.5], dtype=D64)
    y0 = torch.ones(3, 1, dtype=D64, requires_grad=True)
    t0 = torch.tensor([0.0, 0.1, 0.2], dtype=D64, requires_grad=True)
    jump_t = torch.tensor([[0.3], [0.2], [0.9]], dtype=D64)
    event = lambda t, y: y[:, 0] - 0.5  # noqa: E731

    class Decay(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, t, y):  # the rate doubles past the row's jump
            return -self.k[:, None] * y * (1.0 + (t >= jump_t[self.rows, 0]).to(y.dtype))[:, None]

        def row(self, b):
            one = Decay(self.k[b:b + 1])
            one.rows = slice(b, b + 1)
            return one

        rows = slice(None)

    h = 0.01
    batch, single = _rows_vs_single(Decay(k), y0, t0, event, lambda b: event, [y0, t0], method=method,
                                    options={"step_size": h, "jump_t": jump_t})
    _assert_rows_match(batch, single, 1e-13, 1e-10)
    # The grid's error: t_e within a few h^p of the exact event (first order for euler).
    exact = torch.where(torch.log(torch.tensor(2.0, dtype=D64)) / k < jump_t[:, 0] - t0.detach(),
                        t0.detach() + math.log(2.0) / k,
                        jump_t[:, 0] + (math.log(2.0) - k * (jump_t[:, 0] - t0.detach())) / (2 * k))
    torch.testing.assert_close(batch[0], exact, rtol=0.0, atol=0.05 if method == "euler" else 1e-3)


class _Ball(torch.nn.Module):
    """A ball with drag and a small time-dependent push (1-D or batched state)."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(0.1, dtype=D64))

    def forward(self, t, y):
        return torch.stack([y[..., 1], -9.81 - self.k * y[..., 1] + 0.05 * torch.sin(t)], -1)


@pytest.mark.parametrize("method", ["dopri8", "dopri5"])
def test_interpolated_where_the_last_step_ends_an_ulp_short_of_the_end_time(method):
    # dopri8 on [0.3, 0.9] ends its last step at t0 + h = 0.8999999999999999: interpolated never
    # read its nodes at 0.9 (AttributeError in the backward); so did joint events with dopri8.
    func = _Ball()
    y0 = torch.tensor([2.0, 0.5], dtype=D64, requires_grad=True)
    grads = {}
    for t1 in (0.5, 0.9, 1.2):
        for sensitivity in ("interpolated", "checkpointed"):
            ys = pob.odeint(func, y0, torch.tensor([0.3, t1], dtype=D64), method=method, sensitivity=sensitivity,
                            rtol=1e-7, atol=1e-9)
            grads[sensitivity] = torch.autograd.grad(ys[-1].sum(), [y0, func.k])
        for a, b in zip(grads["interpolated"], grads["checkpointed"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    level = torch.tensor(0.2, dtype=D64, requires_grad=True)
    for sensitivity in ("interpolated", "checkpointed"):
        t_e, sol = pob.odeint_event(func, y0, torch.tensor(0.3, dtype=D64), event_fn=lambda t, y: y[0] - level,
                                    method=method, sensitivity=sensitivity, rtol=1e-7, atol=1e-9)
        grads[sensitivity] = torch.autograd.grad(t_e + sol[1].sum(), [y0, func.k, level])
    for a, b in zip(grads["interpolated"], grads["checkpointed"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
