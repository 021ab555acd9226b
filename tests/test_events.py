"""Events: odeint_event / odeint(..., event_fn=...) against exact event times and states, and the
implicit-function gradients against closed forms and finite differences for every gradient method."""
import math

import pytest
import torch
from helpers import fd_grad, rel_err

import pyode_bridge as pob

SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve"]
TIGHT = dict(rtol=1e-11, atol=1e-12)


class Decay(torch.nn.Module):
    """y' = -k y: y(t) = y0 exp(-k (t - t0)) reaches c at t0 + log(y0 / c) / k."""

    def __init__(self, k=1.0, dtype=torch.float64):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=dtype))

    def forward(self, t, y):
        return -self.k * y


class FreeFall(torch.nn.Module):
    """x' = v, v' = -g on a tuple state (x, v)."""

    def __init__(self, g=9.81):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=torch.float64))

    def forward(self, t, state):
        x, v = state
        return v, -self.g * torch.ones_like(v)


def ground(t, state):
    return state[0]


# Fixed-step methods solve at step_size 0.01 (cubic Hermite dense output), as torchdiffeq's tests.
METHODS = [("dopri5", {}, 1e-8), ("tsit5", {}, 1e-8), ("bosh3", {}, 1e-7),
           ("adaptive_heun", {"rtol": 1e-7}, 1e-6), ("rk4", {"step_size": 0.01}, 1e-8),
           ("midpoint", {"step_size": 0.01}, 1e-4), ("euler", {"step_size": 0.01}, 1e-2),
           ("implicit_adams", {"step_size": 0.01}, 1e-7), ("dopri5", {"step_size": 0.05}, 1e-7),
           ("dopri8", {}, 1e-8), ("gl4", {"step_size": 0.01}, 1e-8), ("radauIIA5", {"step_size": 0.05}, 1e-8),
           ("implicit_euler", {"step_size": 0.01}, 1e-2)]


@pytest.mark.parametrize("method,options,tol", METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_event_time_of_exponential_decay(method, options, tol, reverse):
    options = dict(options)
    rtol = options.pop("rtol", 1e-10)
    # Forward: y0 = 1 decays to 0.5 at ln 2. Reverse: y0 = 0.5 grows back to 1 at -ln 2.
    func = Decay()
    y0 = torch.tensor([0.5 if reverse else 1.0], dtype=torch.float64)
    level = 1.0 if reverse else 0.5
    t_e, sol = pob.odeint_event(func, y0, 0.0, event_fn=lambda t, y: y[0] - level, reverse_time=reverse,
                                method=method, options=options, rtol=rtol, atol=rtol)
    expect = -math.log(2.0) if reverse else math.log(2.0)
    assert sol.shape == (2, 1) and t_e.shape == ()
    assert abs(t_e.item() - expect) < tol * abs(expect)
    assert torch.equal(sol[0], y0)
    # The root is found on the dense output to float64 resolution: the state returned sits on the
    # level set whatever the method's error in time, to the round-off of evaluating the dense
    # output (dopri8's 7th-order extension sums large coefficients: at adjacent float times near
    # the reverse root it reads 1 + 2.3e-14 and 1 - 1.8e-15).
    assert abs(sol[1, 0].item() - level) < (1e-13 if method == "dopri8" else 1e-14)
    # ... on the start side of the crossing (so a restarted solve does not fire again at once).
    assert (sol[1, 0].item() - level) * (y0[0].item() - level) >= 0


def test_root_finding_costs_no_evaluation_of_func():
    calls = []

    def func(t, y):
        calls.append(float(t))
        return -y

    stats = pob.SolveStats()
    t_e, _ = pob.odeint(func, torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0]),
                        event_fn=lambda t, y: y.sum() - 1.5, stats=stats)
    assert abs(t_e.item() - math.log(2.0)) < 1e-7
    # dopri5 (FSAL): f(t0), one probe for the initial step, then 6 evaluations per attempted step.
    assert len(calls) == stats.nfe_forward == 2 + 6 * (stats.steps_forward + stats.steps_rejected)
    assert max(calls) <= stats.steps_forward  # never evaluated past the step holding the event


def test_event_past_t1_and_growing_horizons():
    # t[1] only sets the direction: the event at t = 50 ln 2 lies far beyond it.
    t_e, sol = pob.odeint(Decay(0.02), torch.tensor([1.0], dtype=torch.float64),
                          torch.tensor([0.0, 0.1], dtype=torch.float64), event_fn=lambda t, y: y - 0.5,
                          **TIGHT)
    assert abs(t_e.item() - 50 * math.log(2.0)) < 1e-8
    assert abs(sol[-1].item() - 0.5) < 1e-14


def test_free_fall_tuple_state_values_and_closed_form_gradients():
    for sens in SENSITIVITIES:
        func = FreeFall()
        h = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
        v0 = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
        t0 = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
        t_e, (x, v) = pob.odeint_event(func, (h, v0), t0, event_fn=ground, sensitivity=sens, **TIGHT)
        g, hh, vv = 9.81, 10.0, 1.5
        s = math.sqrt(vv ** 2 + 2 * g * hh)
        assert abs(t_e.item() - (0.25 + (vv + s) / g)) < 1e-12
        assert abs(v[1].item() + s) < 1e-11 and abs(x[1].item()) < 1e-13
        assert x.shape == (2, 1) and v.shape == (2, 1) and torch.equal(x[0], h.detach())
        # Closed forms: t_e = t0 + (v0 + s) / g, v_e = -s, x_e = 0.
        want = {
            "t": [1 / s, (1 + vv / s) / g, hh / (g * s) - (vv + s) / g ** 2, 1.0],
            "v": [-g / s, -vv / s, -hh / s, 0.0],
            "x": [0.0, 0.0, 0.0, 0.0],
        }
        tol = 1e-9 if sens in ("backprop", "checkpointed") else 1e-6
        for name, out in (("t", t_e), ("v", v[1, 0]), ("x", x[1, 0])):
            got = torch.autograd.grad(out, (h, v0, func.g, t0), retain_graph=True, allow_unused=True)
            got = [0.0 if gi is None else gi.item() for gi in got]
            for gi, wi in zip(got, want[name]):
                assert abs(gi - wi) < tol * (1 + abs(wi)), (sens, name, got, want[name])


class OwnBackprop(pob.Sensitivity):
    """A gradient method of one's own that differentiates through the solve, as backprop does."""

    name = "own_backprop"
    through_autograd = True
    solves_backward = False

    def solve(self, prob, y0):
        return pob.Backprop().solve(prob, y0)


def test_a_method_through_autograd_is_differentiated_in_the_event_search():
    """The event search asks the method what it needs, not its class: a method of one's own that
    declares ``through_autograd`` is differentiated where the search runs, as backprop is (no second
    solve: the same evaluations), with backprop's gradient."""
    got = {}
    for sens in ("backprop", OwnBackprop()):
        func = FreeFall()
        h = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
        v0 = torch.tensor([1.5], dtype=torch.float64, requires_grad=True)
        stats = pob.SolveStats()
        t_e, (x, v) = pob.odeint_event(func, (h, v0), torch.tensor(0.0, dtype=torch.float64),
                                       event_fn=ground, sensitivity=sens, stats=stats, **TIGHT)
        got[str(sens)] = (stats.nfe_forward, t_e.detach(), torch.autograd.grad(t_e, (h, v0, func.g)))
    (nfe_b, t_b, g_b), (nfe_o, t_o, g_o) = got.values()
    assert nfe_o == nfe_b
    assert torch.equal(t_o, t_b)
    assert all(torch.equal(a, b) for a, b in zip(g_o, g_b))


class Forced(torch.nn.Module):
    """A non-autonomous, nonlinear right-hand side with parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 2).double()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) + self.w * torch.stack([torch.cos(2 * t), torch.sin(t)]) - 0.3 * y


@pytest.mark.parametrize("sens", SENSITIVITIES)
def test_gradients_match_finite_differences(sens):
    # The event depends on the state, the time and a parameter of event_fn itself.
    func = Forced()
    y0 = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def event_fn(t, y):
        return y[0] + 0.5 * y[1] + 0.1 * t - c

    def loss(t_e, sol):
        return 1.3 * t_e + (sol[1] * torch.tensor([0.8, -1.1], dtype=torch.float64)).sum()

    # interpolated's Chebyshev nodes cannot follow this trajectory to 1e-11 (it warns): ask for less.
    tols = dict(rtol=1e-9, atol=1e-10) if sens == "interpolated" else TIGHT
    t_e, sol = pob.odeint_event(func, y0, t0, event_fn=event_fn, sensitivity=sens, **tols)
    assert 2.5 < t_e.item() < 3.5
    inputs = [y0, c, t0, func.w, *func.lin.parameters()]
    grads = torch.autograd.grad(loss(t_e, sol), inputs)
    got = torch.cat([g.reshape(-1) for g in grads])

    def value():
        with torch.no_grad():
            return loss(*pob.odeint_event(func, y0, t0, event_fn=event_fn, **TIGHT))

    want = fd_grad(value, inputs, eps=1e-5)
    assert rel_err(got, want) < 1e-7  # measured ~2e-9 for every method (the finite differences' own)


def test_values_do_not_depend_on_the_gradient_method():
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    out = [pob.odeint_event(Forced(), y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, sensitivity=s)
           for s in SENSITIVITIES]
    for t_e, sol in out[1:]:
        assert torch.equal(t_e, out[0][0]) and torch.equal(sol, out[0][1])


def test_event_fn_parameter_alone_and_closed_form():
    # y' = -k y from y0 = 2: t_e = log(2 / c) / k, so dt/dc = -1 / (k c), dt/dk = -t_e / k.
    func = Decay(1.5)
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    for sens in ("backprop", "backsolve"):
        t_e, sol = pob.odeint_event(func, torch.tensor([2.0], dtype=torch.float64), 0.0,
                                    event_fn=lambda t, y: y[0] - c, sensitivity=sens, **TIGHT)
        te = math.log(4.0) / 1.5
        assert abs(t_e.item() - te) < 1e-10
        g_c, g_k = torch.autograd.grad(t_e, (c, func.k), retain_graph=True)
        assert abs(g_c.item() + 1 / (1.5 * 0.5)) < 1e-8
        assert abs(g_k.item() + te / 1.5) < 1e-8
        # y_e = c exactly: dy_e/dc = 1 and dy_e/dk = 0 (the f * dt_e/dp term cancels dY/dp).
        g_c, g_k = torch.autograd.grad(sol[1, 0], (c, func.k))
        assert abs(g_c.item() - 1.0) < 1e-8 and abs(g_k.item()) < 1e-8


def test_several_event_components_first_crossing_wins():
    # Component 0 crosses first (y = 0.5 at ln 2); component 1 starts negative and would cross at
    # y = 0.3. Components of different initial signs are each watched for their own sign change.
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t_e, sol = pob.odeint_event(Decay(), y0, 0.0,
                                event_fn=lambda t, y: torch.stack([0.3 - y[0], y[0] - 0.5, y[0] - 0.1]),
                                **TIGHT)
    assert abs(t_e.item() - math.log(2.0)) < 1e-10
    (g,) = torch.autograd.grad(t_e, y0)
    assert abs(g.item() - 1.0) < 1e-8  # t_e = log(y0 / 0.5)
    # And with the levels swapped, the other component fires.
    t_e, _ = pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: torch.stack([y[0] - 0.1, y[0] - 0.8]),
                              **TIGHT)
    assert abs(t_e.item() - math.log(1.25)) < 1e-10


def test_float32_event_and_gradient():
    y0 = torch.tensor([1.0, 2.0], requires_grad=True)
    func = Decay(1.0, dtype=torch.float32)
    t_e, sol = pob.odeint_event(func, y0, torch.tensor(0.0), event_fn=lambda t, y: y.sum() - 1.5,
                                rtol=1e-6, atol=1e-7)
    assert t_e.dtype == torch.float32 and sol.dtype == torch.float32
    assert abs(t_e.item() - math.log(2.0)) < 1e-5
    (g,) = torch.autograd.grad(t_e, y0)  # t_e = log(sum(y0) / 1.5): dt/dy0_i = 1 / sum(y0)
    assert torch.allclose(g, torch.full((2,), 1 / 3.0), rtol=1e-4)


def test_odeint_adjoint_event_backward_runs_twice_as_torchdiffeq_tests():
    func = Decay(0.7)
    y0 = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    t_e, sol = pob.odeint_adjoint(func, y0, t, event_fn=lambda t, y: y[0] - 1.0, **TIGHT)
    t_e.backward(retain_graph=True)
    assert abs(y0.grad.item() - 1 / (0.7 * 2.0)) < 1e-7
    assert abs(t.grad[0].item() - 1.0) < 1e-7 and t.grad[1].item() == 0.0  # t[1] is only a direction
    sol[-1].sum().backward()  # y_e = 1 whatever y0: its gradient adds nothing
    assert abs(y0.grad.item() - 1 / (0.7 * 2.0)) < 1e-7


def test_stats_count_search_and_gradient_solve():
    stats = pob.SolveStats()
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t_e, _ = pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, sensitivity="backsolve",
                              stats=stats)
    plain = pob.SolveStats()
    with torch.no_grad():
        pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, stats=plain)
    # The search, then the re-solve to the event time that backsolve differentiates, then f(t_e).
    assert stats.nfe_forward > plain.nfe_forward + 10
    t_e.backward()
    assert stats.nfe_backward > 0


def test_no_event_gives_a_clear_error_not_a_hang():
    y0 = torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(pob.SolverError, match=r"no event after 40 accepted steps.*max_num_steps"):
        pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 2.0, options={"max_num_steps": 40})
    with pytest.raises(pob.SolverError, match=r"no event after 300 accepted steps.*reverse_time"):
        pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 2.0, method="rk4",
                         options={"step_size": 0.1, "max_num_steps": 300})
    # Constant state: the steps grow without bound; the horizon stays finite and the cap ends it.
    with pytest.raises(pob.SolverError, match="no event"):
        pob.odeint_event(lambda t, y: torch.zeros_like(y), y0, 0.0, event_fn=lambda t, y: y[0] - 2.0)


def test_bad_event_calls_name_the_fix():
    y0 = torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly 2 times"):
        pob.odeint(Decay(), y0, torch.linspace(0, 1, 3), event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="step_size"):
        pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, method="rk4")
    with pytest.raises(ValueError, match="torch backend"):
        pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, backend="julia")
    with pytest.raises(ValueError, match="must return a tensor"):
        pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: 1.0)
    with pytest.raises(ValueError, match="single time"):
        pob.odeint_event(Decay(), y0, torch.zeros(2), event_fn=lambda t, y: y[0] - 0.5)


def test_tangential_event_raises_on_backward_only():
    # (y - 0.5)**3 crosses zero where its derivative vanishes: the event time is found, but the
    # implicit function theorem has nothing to divide by.
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t_e, _ = pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: (y[0] - 0.5) ** 3, **TIGHT)
    assert abs(t_e.item() - math.log(2.0)) < 1e-9
    with pytest.raises(pob.SolverError, match="tangential"):
        t_e.backward()


def test_second_derivatives_are_refused_not_silently_wrong():
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    t_e, _ = pob.odeint_event(Decay(), y0, 0.0, event_fn=lambda t, y: y[0] - 0.5)
    (g,) = torch.autograd.grad(t_e, y0, create_graph=True)
    assert abs(g.item() - 1.0) < 1e-6
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


def test_event_at_the_start_returns_t0():
    y0 = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    t_e, sol = pob.odeint_event(Decay(), y0, 2.0, event_fn=lambda t, y: y[0] - 0.5)
    assert t_e.item() == 2.0 and torch.equal(sol[1], y0.detach())
    (g,) = torch.autograd.grad(t_e, y0)  # t_e = 2 + log(y0 / 0.5) near the start
    assert abs(g.item() - 2.0) < 1e-12


def test_scipy_solver_events_forward_and_with_an_adjoint():
    pytest.importorskip("scipy")
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    kw = dict(event_fn=lambda t, y: y[0] - 0.5, method="scipy_solver", options={"solver": "DOP853"},
              **TIGHT)
    t_e, sol = pob.odeint_event(Decay(), y0, 0.0, sensitivity="backsolve", **kw)
    assert abs(t_e.item() - math.log(2.0)) < 1e-9 and abs(sol[1].item() - 0.5) < 1e-13
    (g,) = torch.autograd.grad(t_e, y0)
    assert abs(g.item() - 1.0) < 1e-6
    t_e, _ = pob.odeint_event(Decay(), y0, 0.0, **kw)  # backprop: scipy is forward only
    with pytest.raises(ValueError, match="forward only"):
        t_e.backward()


def test_backprop_reaches_tensors_only_autograd_can_see():
    # The rate hides in a dict: find_parameters cannot see it, autograd through the search can.
    hidden = {"k": torch.tensor(1.5, dtype=torch.float64, requires_grad=True)}
    t_e, sol = pob.odeint_event(lambda t, y: -hidden["k"] * y, torch.tensor([2.0], dtype=torch.float64), 0.0,
                                event_fn=lambda t, y: y[0] - 0.5, **TIGHT)
    (g,) = torch.autograd.grad(t_e, hidden["k"])
    assert abs(g.item() + math.log(4.0) / 1.5 ** 2) < 1e-8  # t_e = log(4) / k


class Ball(torch.nn.Module):
    """torchdiffeq's bouncing-ball example: free fall, and at each impact the velocity reverses and
    loses a fraction ``absorption``; the next solve starts at the previous event time."""

    def __init__(self):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(9.8, dtype=torch.float64))
        self.absorption = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
        self.x0 = torch.nn.Parameter(torch.tensor([10.0], dtype=torch.float64))
        self.t0 = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, t, state):
        return state[1], -self.g * torch.ones_like(state[1])

    def last_impact(self, bounces, sensitivity):
        t, state = self.t0, (self.x0, torch.zeros(1, dtype=torch.float64))
        for _ in range(bounces):
            t, (x, v) = pob.odeint_event(self, state, t, event_fn=lambda t, s: s[0], sensitivity=sensitivity,
                                         **TIGHT)
            # Start just above the ground so the next solve does not stop at once (as torchdiffeq's).
            state = (x[-1] + 1e-7, -v[-1] * (1 - self.absorption))
        return t


@pytest.mark.parametrize("sens", ["backprop", "backsolve"])
def test_bouncing_ball_chained_events(sens):
    ball = Ball()
    t3 = ball.last_impact(3, sens)
    # Closed form up to the 1e-7 lifts: t0 + sqrt(2 h / g) * (1 + 2 (1 - a) + 2 (1 - a)^2).
    series = 1 + 2 * 0.8 + 2 * 0.64
    assert abs(t3.item() - (0.3 + math.sqrt(2 * 10.0 / 9.8) * series)) < 1e-6
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(t3, list(ball.parameters()))])

    def value():
        with torch.no_grad():
            return ball.last_impact(3, "backprop")

    want = fd_grad(value, list(ball.parameters()), eps=1e-5)
    assert rel_err(got, want) < 1e-7


@pytest.mark.parametrize("method", ["rk4", "gl4", "implicit_adams", "dopri8"])
@pytest.mark.parametrize("sens", ["backprop", "interpolating"])
def test_gradients_of_fixed_step_and_implicit_methods(method, sens):
    # y' = -k y from y0 to c: t_e = log(y0 / c) / k; dt/dy0 = 1 / (k y0), dt/dk = -t_e / k.
    func = Decay(0.8)
    y0 = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    options = {} if method == "dopri8" else {"step_size": 0.01}
    t_e, _ = pob.odeint_event(func, y0, 0.0, event_fn=lambda t, y: y[0] - 0.5, method=method, options=options,
                              sensitivity=sens, **TIGHT)
    te = math.log(4.0) / 0.8
    assert abs(t_e.item() - te) < 1e-8
    g_y0, g_k = torch.autograd.grad(t_e, (y0, func.k))
    assert abs(g_y0.item() - 1 / (0.8 * 2.0)) < 1e-7 and abs(g_k.item() + te / 0.8) < 1e-7


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
@pytest.mark.parametrize("sens", ["backprop", "backsolve"])
def test_events_on_cuda_match_the_cpu(sens):
    def run(device):
        func = Forced().to(device)
        y0 = torch.tensor([0.3, -0.2], dtype=torch.float64, device=device, requires_grad=True)
        c = torch.tensor(0.6, dtype=torch.float64, device=device, requires_grad=True)
        t_e, sol = pob.odeint_event(func, y0, 0.1, event_fn=lambda t, y: y[0] + 0.5 * y[1] + 0.1 * t - c,
                                    sensitivity=sens, rtol=1e-9, atol=1e-10)
        assert t_e.device.type == device and sol.device.type == device
        grads = torch.autograd.grad(t_e + sol[1].sum(), [y0, c, *func.parameters()])
        return t_e.item(), sol.detach().cpu(), torch.cat([g.reshape(-1) for g in grads]).cpu()

    t_cpu, sol_cpu, g_cpu = run("cpu")
    t_gpu, sol_gpu, g_gpu = run("cuda")
    assert abs(t_cpu - t_gpu) < 1e-9 and torch.allclose(sol_cpu, sol_gpu, atol=1e-9)
    assert rel_err(g_gpu, g_cpu) < 1e-7


# --- the event is the FIRST time event_fn reaches zero (touching or crossing) --------------------

FALL = math.sqrt(10.0 / 4.9)  # free fall from 10 m at g = 9.8 reaches the ground


def _fall(event_fn, reverse=False, interface=pob.odeint_event, **kwargs):
    state = (torch.tensor([10.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    t_e, sol = interface(FreeFall(9.8), state, torch.tensor(0.0, dtype=torch.float64), event_fn=event_fn,
                         reverse_time=reverse, **kwargs)
    return t_e.item(), sol


FIRST_ROOT_METHODS = [("dopri5", {}), ("tsit5", {}), ("dopri8", {}), ("rk4", {"step_size": 0.1}),
                      ("implicit_adams", {"step_size": 0.1})]


@pytest.mark.parametrize("method,options", FIRST_ROOT_METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_root_before_a_guard_that_zeroes_event_fn(method, options, reverse):
    # event_fn = pos while |t| <= 1.5, 0 after (torchdiffeq's learn_physics end-time guard): the
    # ground is reached first, at sqrt(10 / 4.9), though a step may end past 1.5 where event_fn is
    # exactly 0.
    sign = -1.0 if reverse else 1.0
    t_e, sol = _fall(lambda t, s: s[0] if abs(t) <= 1.5 else torch.zeros_like(s[0]), reverse,
                     method=method, options=options, **TIGHT)
    assert abs(t_e - sign * FALL) < 1e-9
    assert abs(sol[0][-1].item()) < 1e-8  # on the ground, not below it


@pytest.mark.parametrize("method,options", FIRST_ROOT_METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_guard_reached_before_any_root_is_the_event(method, options, reverse):
    # pos + 1000 has no root before |t| = 3: the first zero of event_fn is the guard's.
    sign = -1.0 if reverse else 1.0
    t_e, _ = _fall(lambda t, s: s[0] + 1000.0 if abs(t) <= 3.0 else torch.zeros_like(s[0]), reverse,
                   method=method, options=options, **TIGHT)
    assert 3.0 <= sign * t_e <= 3.0 + 1e-12


def test_guard_through_the_torchdiffeq_module():
    import pyode_bridge.torchdiffeq as tdc

    t_e, _ = _fall(lambda t, s: s[0] if t <= 1.5 else torch.zeros_like(s[0]), interface=tdc.odeint_event,
                   rtol=1e-8, atol=1e-8)
    assert abs(t_e - FALL) < 1e-7


def test_bouncing_ball_with_an_end_time_guard_never_falls_through_the_floor():
    # learn_physics.py's loop: bounce (restitution 0.8, pos nudged up 1e-7) until the guard at
    # t_end = 6 ends it. Each flight's closed form gives the bounce times.
    t_end, g = 6.0, 9.8

    def event_fn(t, s):
        return torch.zeros_like(t) if t > t_end else s[0]

    state = (torch.tensor([10.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    t0, x, v, lowest = 0.0, 10.0, 0.0, math.inf
    expected = []
    while t0 < t_end and len(expected) < 20:
        t_hit = t0 + (v + math.sqrt(v * v + 2 * g * x)) / g
        expected.append(min(t_hit, t_end))
        t_e, sol = pob.odeint_event(FreeFall(g), state, torch.tensor(t0, dtype=torch.float64), event_fn=event_fn,
                                    **TIGHT)
        assert abs(t_e.item() - expected[-1]) < 1e-8, (len(expected), t_e.item(), expected[-1])
        lowest = min(lowest, sol[0][-1].item())
        if t_hit >= t_end:
            break
        v_hit = v - g * (t_hit - t0)
        x, v, t0 = 1e-7, -0.8 * v_hit, t_e.item()
        state = (sol[0][-1] + 1e-7, -0.8 * sol[1][-1])
    assert expected[-1] == t_end and len(expected) > 2
    assert lowest > -1e-8


def _rising(t, y):
    return torch.ones_like(y)  # y = t: the solvers are exact, so their steps grow large


# Steps of 1.7 (the first step, for the adaptive methods): both roots near 1.3 lie inside the first.
LONG_STEP = [("dopri5", {"first_step": 1.7}), ("tsit5", {"first_step": 1.7}), ("dopri8", {"first_step": 1.7}),
             ("bosh3", {"first_step": 1.7}), ("rk4", {"step_size": 1.7}), ("euler", {"step_size": 1.7}),
             ("implicit_adams", {"step_size": 1.7}), ("radauIIA5", {"step_size": 1.7})]


@pytest.mark.parametrize("method,options", LONG_STEP)
@pytest.mark.parametrize("reverse", [False, True])
def test_two_roots_inside_one_step_gives_the_first(method, options, reverse):
    # (y - 1.3)^2 - 1e-4 is negative only on (1.29, 1.31) for y = t (-(1.31, 1.29) backwards): the
    # step's ends see event_fn positive.
    sign = -1.0 if reverse else 1.0
    t_e, _ = pob.odeint_event(_rising, torch.zeros(1, dtype=torch.float64), 0.0, reverse_time=reverse,
                              event_fn=lambda t, y: (sign * y[0] - 1.3) ** 2 - 1e-4, method=method,
                              options=options)
    assert abs(t_e.item() - sign * 1.29) < 1e-9


@pytest.mark.parametrize("method,options", LONG_STEP)
@pytest.mark.parametrize("event_fn,tol", [(lambda t, y: (y[0] - 1.3) ** 2, 1e-6),  # a double root
                                          (lambda t, y: (y[0] - 1.3).abs(), 1e-12)],  # a kink
                         ids=["square", "abs"])
def test_a_touch_without_sign_change_is_an_event_whose_gradient_is_refused(method, options, event_fn, tol):
    y0 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    t_e, sol = pob.odeint_event(_rising, y0, 0.0, event_fn=event_fn, method=method, options=options)
    assert abs(t_e.item() - 1.3) < tol
    with pytest.raises(pob.SolverError, match="tangential"):
        t_e.backward()


@pytest.mark.parametrize("method,options", [("dopri5", {"max_step": 0.01}), ("tsit5", {"max_step": 0.02}),
                                            ("fehlberg2", {}), ("rk4", {"step_size": 0.003})])
@pytest.mark.parametrize("c", [0.77, 2.9])
def test_a_kink_touch_on_short_steps_is_not_passed_over(method, options, c):
    # |y - c| on steps much shorter than c: its values in the step are ~1e-2, so G's round-off is far
    # below what one ulp of t near c moves it; the touch must still be found (not the later
    # crossing of the second component, 10 - y, reported instead).
    t_e, _ = pob.odeint_event(_rising, torch.zeros(1, dtype=torch.float64), 0.0, method=method, options=options,
                              event_fn=lambda t, y: torch.stack([(y[0] - c).abs(), 10.0 - y[0]]))
    assert abs(t_e.item() - c) < 1e-12


@pytest.mark.parametrize("method,c", [("fehlberg2", 0.77), ("dopri5", 2.9), ("bosh3", 2.9)])
def test_a_kink_touch_in_float32_is_not_passed_over(method, c):
    # A float32 t moves |t - c| in steps of ~1e-7 near c, far coarser than the search's float64
    # times: the low must be followed to that resolution, not given up on (the later event at
    # t = 10 was reported for the first two).
    def fall(t, y):
        return torch.stack([y[1], -9.8 * torch.ones_like(y[1])])

    t_e, _ = pob.odeint_event(fall, torch.tensor([10.0, 0.0]), 0.0, method=method,
                              event_fn=lambda t, y: torch.stack([(t - c).abs(), 10.0 - t]))
    assert t_e.dtype == torch.float32
    assert abs(t_e.item() - c) < 8 * torch.finfo(torch.float32).eps * c


@pytest.mark.parametrize("method,options", LONG_STEP)
def test_zero_on_an_interval_inside_a_step_is_reached_at_its_start(method, options):
    # relu(|y - 1.3| - 0.05) is zero on [1.25, 1.35] only, positive on both sides.
    t_e, _ = pob.odeint_event(_rising, torch.zeros(1, dtype=torch.float64), 0.0, method=method, options=options,
                              event_fn=lambda t, y: torch.relu((y[0] - 1.3).abs() - 0.05))
    assert abs(t_e.item() - 1.25) < 1e-12


def test_zero_exactly_at_a_step_end_is_the_event():
    t_e, _ = pob.odeint_event(_rising, torch.zeros(1, dtype=torch.float64), 0.0,
                              event_fn=lambda t, y: y[0] - 0.5, method="rk4", options={"step_size": 0.1})
    assert abs(t_e.item() - 0.5) < 1e-15
    # event_fn 0 from t = 0.3 on (a step's end and the next one's start): reached there, not later
    t_e, _ = pob.odeint_event(_rising, torch.zeros(1, dtype=torch.float64), 0.0, method="rk4",
                              options={"step_size": 0.1},
                              event_fn=lambda t, y: torch.where(t >= 0.3, torch.zeros_like(y[0]), 1.0 - y[0]))
    assert abs(t_e.item() - 0.3) < 1e-15


@pytest.mark.parametrize("event_fn", [lambda t, y: 1.0 + 0.5 * torch.sin(3.0 * y[0]),
                                      lambda t, y: (y[0] - 1.0) ** 2 + 1e-6],
                         ids=["oscillating", "near_miss"])
def test_dips_that_stay_above_zero_are_no_event(event_fn):
    with pytest.raises(pob.SolverError, match="no event after 30 accepted steps"):
        pob.odeint_event(_rising, torch.zeros(1, dtype=torch.float64), 0.0, event_fn=event_fn,
                         options={"max_num_steps": 30, "max_step": 0.5})
