"""Solver options of the one stepping loop: norm, jump_t, step_t, perturb, grid_constructor, min_step,
interp and step callbacks (torchdiffeq's names and semantics), on pob.odeint itself."""
import math
import warnings

import pytest
import torch

import pyode_bridge as pob


class Recorder:
    """func(t, y) = rate(t, y) that records every time it is called at."""

    def __init__(self, rate):
        self.rate, self.ts = rate, []

    def __call__(self, t, y):
        self.ts.append(t.item())
        return self.rate(t, y)


def _jump_rate(t, x):
    # torchdiffeq's _JumpF: the field switches at t = 0.5.
    return -0.5 * x if t < 0.5 else x ** 2


def _jump_exact(x0, t):
    """Exact solution of _jump_rate at t >= 0.5 from x(0) = x0."""
    xj = x0 * math.exp(-0.25)
    return xj / (1 - xj * (t - 0.5))


# ----------------------------------------------------------------------------------------------- norm

def test_norm_receives_the_state_structure():
    seen = []

    def norm(e):
        seen.append(tuple(p.shape for p in e) if isinstance(e, tuple) else e.shape)
        return max(p.abs().max() for p in e) if isinstance(e, tuple) else e.abs().max()

    y0 = (torch.tensor(1.0, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    pob.odeint(lambda t, y: (-y[0], -y[1]), y0, torch.tensor([0.0, 1.0]), options={"norm": norm})
    assert seen and all(s == ((), (2, 2)) for s in seen)
    seen.clear()
    pob.odeint(lambda t, y: -y, torch.ones(3, 1, dtype=torch.float64), torch.tensor([0.0, 1.0]),
               options={"norm": norm})
    assert seen and all(s == (3, 1) for s in seen)


def test_norm_equal_to_the_builtin_gives_the_same_steps_and_a_stricter_one_more():
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    f = lambda t, y: y @ A.T
    y0, t = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.linspace(0.0, 5.0, 3)
    rms = lambda e: e.pow(2).mean().sqrt()
    runs = {}
    for name, opts in (("builtin", {}), ("rms", {"norm": rms}), ("strict", {"norm": lambda e: 10 * rms(e)})):
        s = pob.SolveStats()
        runs[name] = (pob.odeint(f, y0, t, rtol=1e-6, atol=1e-8, options=opts, stats=s), s)
    # The same norm up to round-off (mean-square vs vector norm): the same steps and results.
    assert runs["builtin"][1].nfe_forward == runs["rms"][1].nfe_forward
    assert (runs["builtin"][0] - runs["rms"][0]).abs().max() < 1e-12
    assert runs["strict"][1].steps_forward > runs["builtin"][1].steps_forward
    exact = torch.linalg.matrix_exp(A * 5.0) @ y0
    # 10x stricter error control: a smaller error at the end.
    assert (runs["strict"][0][-1] - exact).norm() < (runs["builtin"][0][-1] - exact).norm()


@pytest.mark.parametrize("sensitivity", ["backsolve", "interpolated", "interpolating"])
def test_adjoint_norm_callable_sees_torchdiffeqs_tuple(sensitivity):
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    f = lambda t, y: (torch.tanh(y[0] @ w) + b, y[0].sum(-1, keepdim=True))
    y0 = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    seen = []

    def norm(tensors):
        seen.append(tuple(x.shape for x in tensors))
        return max(x.abs().max() for x in tensors)

    ys = pob.odeint(f, y0, torch.tensor([0.0, 1.0]), sensitivity=sensitivity, adjoint_params=(w, b),
                    adjoint_options={"norm": norm})
    (ys[0][-1].sum() + ys[1][-1].sum()).backward()
    # (t, *y_parts, *adj_y_parts, *adj_params), as torchdiffeq calls a user's adjoint norm.
    assert seen and set(seen) == {((), (3, 2), (3, 1), (3, 2), (3, 1), (2, 2), ())}
    g_ref = torch.autograd.grad(sum(p[-1].sum() for p in pob.odeint(f, y0, torch.tensor([0.0, 1.0]))), (w, b))
    assert (w.grad - g_ref[0]).abs().max() < 1e-5 and (b.grad - g_ref[1]).abs().max() < 1e-5


def test_forward_norm_sets_the_default_adjoint_norm():
    # torchdiffeq's default backward norm applies the forward's norm to y and adj_y: a 100x stricter
    # forward norm makes the backward solve take more steps too.
    w = torch.tensor([[0.3, -1.0], [1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    f = lambda t, y: torch.tanh(y @ w) * torch.sin(3 * t)
    y0 = torch.ones(2, dtype=torch.float64)
    steps = []
    for scale in (1.0, 100.0):
        s = pob.SolveStats()
        ys = pob.odeint(f, y0, torch.tensor([0.0, 4.0]), rtol=1e-6, atol=1e-6, sensitivity="backsolve",
                        options={"norm": lambda e, k=scale: k * e.pow(2).mean().sqrt()}, stats=s)
        ys[-1].sum().backward()
        steps.append((s.steps_forward, s.steps_backward))
    assert steps[1][0] > steps[0][0] and steps[1][1] > steps[0][1]


def test_bad_norm_is_refused():
    with pytest.raises(ValueError, match="options\\['norm'\\]"):
        pob.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), options={"norm": "max"})


# ------------------------------------------------------------------------------------ jump_t / step_t

@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun"])
def test_jump_t_cuts_evaluations_and_gets_the_answer(method):
    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    plain, better = pob.SolveStats(), pob.SolveStats()
    pob.odeint(_jump_rate, x0, t, rtol=1e-8, atol=1e-8, method=method, stats=plain)
    f = Recorder(_jump_rate)
    yj = pob.odeint(f, x0, t, rtol=1e-8, atol=1e-8, method=method, options={"jump_t": torch.tensor([0.5])},
                    stats=better)
    assert better.nfe_forward < plain.nfe_forward
    exact = torch.tensor([_jump_exact(1.0, 1.0), _jump_exact(0.5, 1.0)], dtype=torch.float64)
    assert (yj[-1] - exact).abs().max() < 1e-6
    # Within a few tolerances. Not compared with the plain solve's error: stepping over the kink,
    # a low-order method lands near the answer by chance at some tolerances (bosh3: 1e-8 here).
    assert (yj[-1] - exact).abs().max() < 10 * 1e-8
    # The step ending at the jump saw func just before it, the next step just after; never at it.
    assert 0.5 not in f.ts
    assert math.nextafter(0.5, 0.0) in f.ts and math.nextafter(0.5, 1.0) in f.ts


@pytest.mark.parametrize("times", [[0.0, 1.0], [0.0, 0.5, 1.0]])  # the jump inside / at an output time
@pytest.mark.parametrize("sensitivity", ["checkpointed", "backsolve", "interpolated", "interpolating"])
def test_jump_t_gradients(sensitivity, times):
    x0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor(times, dtype=torch.float64)
    opts = {"jump_t": torch.tensor([0.5])}
    ref = pob.odeint(_jump_rate, x0, t, rtol=1e-9, atol=1e-9, options=opts)
    g_ref, = torch.autograd.grad(ref[-1].sum(), x0)
    ys = pob.odeint(_jump_rate, x0, t, rtol=1e-9, atol=1e-9, options=opts, sensitivity=sensitivity)
    g, = torch.autograd.grad(ys[-1].sum(), x0)
    xj = x0.detach() * math.exp(-0.25)
    exact = math.exp(-0.25) / (1 - 0.5 * xj) ** 2
    assert (g_ref - exact).abs().max() < 1e-6
    if sensitivity == "checkpointed":
        # Replays the forward's steps, jump evaluations included: backprop's gradient to round-off.
        assert (g - g_ref).abs().max() < 1e-12
    else:
        assert (g - exact).abs().max() < 1e-5


def test_jump_t_in_decreasing_time():
    # Integrate back from t=1 to t=0 through the jump; the solution is the forward one reversed.
    x1 = torch.tensor([_jump_exact(1.0, 1.0)], dtype=torch.float64)
    f = Recorder(_jump_rate)
    ys = pob.odeint(f, x1, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=1e-10, atol=1e-10,
                    options={"jump_t": [0.5]})
    assert abs(ys[-1].item() - 1.0) < 1e-7
    assert 0.5 not in f.ts and math.nextafter(0.5, 0.0) in f.ts and math.nextafter(0.5, 1.0) in f.ts


@pytest.mark.parametrize("times", [[0.0, 2.5], [2.5, 0.0]])
@pytest.mark.parametrize("method,step,tol", [("dopri5", None, 1e-9), ("rk4", 0.01, 2e-7),
                                             ("radauIIA3", 0.01, 5e-6)])
@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve", "interpolated", "interpolating",
                                         "checkpointed"])
def test_jump_t_with_perturb_gradients_match_the_analytic_ones(sensitivity, method, step, tol, times):
    # y' = -k s(t) y, s = 0.5 before t = 1 and 2 after: y(T) = y0 exp(-k S(T)), S = int_0^T s.
    # perturb moves the evaluations at t = 0 to 5e-324, where interpolated's z was NaN.
    k = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    f = lambda t, y: -k * torch.where(t < 1.0, 0.5, 2.0).to(y.dtype) * y
    opts = {"jump_t": [1.0], "perturb": True} | ({} if step is None else {"step_size": step})
    rtol = 1e-12 if step is None else 1e-6
    ys = pob.odeint(f, y0, torch.tensor(times, dtype=torch.float64), method=method, rtol=rtol, atol=rtol,
                    sensitivity=sensitivity, options=opts)
    g_k, g_y0 = torch.autograd.grad(ys[-1].sum(), (k, y0))
    big_s = (0.5 + 2.0 * 1.5) * (1.0 if times[0] == 0.0 else -1.0)
    decay = math.exp(-1.3 * big_s)
    assert abs(g_k.item() / (-big_s * decay * 1.5) - 1) < tol
    assert (g_y0 / decay - 1).abs().max() < tol


def test_step_t_lands_on_the_times():
    f = Recorder(lambda t, y: torch.cos(t) * y)
    stops = [0.3, 1.7, 2.25]
    ys = pob.odeint(f, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 3.0], dtype=torch.float64),
                    rtol=1e-5, atol=1e-5, options={"step_t": torch.tensor(stops, dtype=torch.float64)})
    # dopri5 is FSAL: every accepted step ends with an evaluation at its end time.
    assert all(s in f.ts for s in stops)
    assert abs(ys[-1].item() - math.exp(math.sin(3.0))) < 1e-4


def test_step_t_and_jump_t_must_not_repeat():
    with pytest.raises(ValueError, match="repeated"):
        pob.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]),
                   options={"step_t": [0.5], "jump_t": [0.5]})


# --------------------------------------------------------------------------------------------- perturb

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "explicit_adams", "implicit_adams"])
def test_perturb_keeps_func_off_the_grid_points(method, dtype):
    for perturb in (True, False):
        f = Recorder(lambda t, x: -x)
        x0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
        xs = pob.odeint(f, x0, torch.tensor([0.0, 1.0]), method=method, sensitivity="backsolve",
                        options={"step_size": 0.5, "perturb": perturb})
        assert (0.0 in f.ts) != perturb and (0.5 in f.ts) != perturb
        f.ts.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the backsolve guard on this tiny problem
            xs.sum().backward()
        assert (1.0 in f.ts) != perturb and (0.5 in f.ts) != perturb


def test_perturb_integrates_a_piecewise_constant_forcing_exactly():
    # rk4's last stage of the step [0, 0.5] lands on t = 0.5, where the forcing switches from 1 to 2:
    # without perturb it reads the value after the switch.
    rate = lambda t, y: torch.where(t < 0.5, 1.0, 2.0).to(y.dtype).expand_as(y)
    y0, t = torch.zeros(1, dtype=torch.float64), torch.tensor([0.0, 1.0])
    exact = 1.5
    plain = pob.odeint(rate, y0, t, method="rk4", options={"step_size": 0.5})[-1].item()
    perturbed = pob.odeint(rate, y0, t, method="rk4", options={"step_size": 0.5, "perturb": True})[-1].item()
    assert abs(perturbed - exact) < 1e-12
    assert abs(plain - exact) > 0.05


# ---------------------------------------------------------------------------------- grid_constructor

@pytest.mark.filterwarnings("ignore:backward pass \\(backsolve\\)")  # reverse Euler != forward Euler
@pytest.mark.parametrize("sensitivity", ["backprop", "backsolve"])
def test_grid_constructor(sensitivity):
    calls = []

    def grid_constructor(func, y0, t):
        calls.append(t.tolist())
        return torch.linspace(float(t[0]), float(t[-1]), 11)

    x0 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    xs = pob.odeint(lambda t, x: x, x0, torch.tensor([0.0, 1.0]), method="euler", sensitivity=sensitivity,
                    options={"grid_constructor": grid_constructor})
    assert abs(xs[1].item() - 1.1 ** 10) < 1e-12  # Euler on its 10 steps
    xs[1].backward()
    assert abs(x0.grad.item() - 1.1 ** 10) < 1e-10
    # The backward solve asks for its own interval's grid, in its direction.
    assert calls == ([[0.0, 1.0]] if sensitivity == "backprop" else [[0.0, 1.0], [1.0, 0.0]])


def test_grid_constructor_errors():
    f, y0, t = (lambda t, x: x), torch.ones(1), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="mutually exclusive"):
        pob.odeint(f, y0, t, method="euler", options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t})
    with pytest.raises(ValueError, match="must start at"):
        pob.odeint(f, y0, t, method="euler", options={"grid_constructor": lambda f, y, t: torch.linspace(0, 2, 5)})
    with pytest.raises(ValueError, match="strictly"):
        pob.odeint(f, y0, t, method="euler",
                   options={"grid_constructor": lambda f, y, t: torch.tensor([0.0, 0.6, 0.4, 1.0])})


# -------------------------------------------------------------------------------------------- min_step

def test_min_step_bounds_the_step_count():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64) * 0.3
    f = lambda t, y: y @ A.T
    y0, t = torch.ones(6, dtype=torch.float64), torch.linspace(1.0, 8.0, 10)
    loose, bounded = pob.SolveStats(), pob.SolveStats()
    pob.odeint(f, y0, t, stats=loose)
    pob.odeint(f, y0, t, options={"min_step": 2.0}, stats=bounded)
    # Every step but the last is at least min_step long, and a step that short is never rejected.
    assert bounded.steps_forward <= math.ceil(7.0 / 2.0)
    assert loose.steps_forward > 3 * bounded.steps_forward


def test_min_step_above_max_step_is_refused():
    with pytest.raises(ValueError, match="min_step"):
        pob.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]),
                   options={"min_step": 0.5, "max_step": 0.1})


# ---------------------------------------------------------------------------------------------- interp

def _interp_error(interp, h):
    """Max error at output times between grid points of rk4 on y' = cos(t) y."""
    t = torch.linspace(0.0, 2.0, 41, dtype=torch.float64)  # mostly between grid points
    opts = {"step_size": h}
    if interp is not None:
        opts["interp"] = interp
    ys = pob.odeint(lambda s, y: torch.cos(s) * y, torch.ones(1, dtype=torch.float64), t, method="rk4",
                    options=opts)
    return (ys[:, 0] - torch.exp(torch.sin(t))).abs().max().item()


def test_interp_linear_is_second_order_and_cubic_fourth():
    lin = [_interp_error("linear", h) for h in (0.3, 0.15)]
    cub = [_interp_error("cubic", h) for h in (0.3, 0.15)]
    assert 3.0 < lin[0] / lin[1] < 5.5  # O(h^2)
    assert cub[0] / cub[1] > 11.0  # O(h^4)
    assert cub[1] < lin[1] / 50
    assert _interp_error(None, 0.15) == cub[1]  # rk4's own extension is the cubic Hermite one


def test_interp_bad_value():
    with pytest.raises(ValueError, match="interp"):
        pob.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="rk4",
                   options={"interp": "quadratic"})


# ------------------------------------------------------------------------------------------- callbacks

class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).double()
        self.calls = {}

    def forward(self, t, y):
        return torch.tanh(self.lin(y))

    def _count(self, name):
        def cb(t0, y0, dt):
            assert t0.dim() == 0 and dt.dim() == 0
            self.calls.setdefault(name, []).append((t0.item(), dt.item(), tuple(y0.shape)))
        return cb

    def attach(self, *names):
        for n in names:
            setattr(self, n, self._count(n))
        return self


@pytest.mark.filterwarnings("ignore:backward pass \\(backsolve\\)")
@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams", "implicit_adams"])
def test_fixed_grid_callbacks(method):
    f = Counting().attach("callback_step", "callback_step_adjoint")
    y0 = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    ys = pob.odeint(f, y0, torch.tensor([0.0, 1.0]), method=method, sensitivity="backsolve",
                    options={"step_size": 0.1})
    steps = f.calls["callback_step"]
    assert len(steps) == 10 and all(shape == (3, 2) for _, _, shape in steps)
    assert [round(t0, 12) for t0, _, _ in steps] == [round(0.1 * k, 12) for k in range(10)]
    assert "callback_step_adjoint" not in f.calls
    ys.sum().backward()
    back = f.calls["callback_step_adjoint"]
    assert len(back) == 10 and all(dt < 0 for _, dt, _ in back)


def test_adaptive_callbacks_count_every_attempt():
    f = Counting().attach("callback_step", "callback_accept_step", "callback_reject_step")
    s = pob.SolveStats()
    # A large first step forces rejections.
    pob.odeint(f, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 5.0]), rtol=1e-9, atol=1e-9,
               options={"first_step": 2.0}, stats=s)
    assert s.steps_rejected > 0
    assert len(f.calls["callback_accept_step"]) == s.steps_forward
    assert len(f.calls["callback_reject_step"]) == s.steps_rejected
    assert len(f.calls["callback_step"]) == s.steps_forward + s.steps_rejected


def test_callbacks_a_method_never_calls_warn():
    f = Counting().attach("callback_accept_step")
    with pytest.warns(UserWarning, match="does not support callbacks"):
        pob.odeint(f, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0]), method="rk4")
    pytest.importorskip("scipy")
    f = Counting().attach("callback_step")
    with pytest.warns(UserWarning, match="does not support callbacks"):
        pob.odeint(f, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0]), method="scipy_solver")


def test_julia_backend_refuses_loop_options():
    with pytest.raises(ValueError, match="backend='julia' does not support"):
        pob.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), backend="julia",
                   options={"jump_t": [0.5]})


def test_options_are_parsed_once_into_the_configs_parts():
    """make_config puts each option in its named part of SolverConfig (a tuple state's norm
    splits too); the parts are frozen, so a derived config never changes the one it came from."""
    import dataclasses

    from pyode_bridge._state import StateSpec
    from pyode_bridge._validate import make_config
    from pyode_bridge.solvers import METHODS, AccelOptions, ControlOptions, NewtonOptions, TimeOptions

    opts = {"newton_tol": 1e-6, "max_newton_iters": 5, "jacobian": "dense", "grid": torch.linspace(0, 1, 5),
            "dtype": torch.float64, "perturb": True, "jump_t": [0.5], "max_num_steps": 7, "interp": "linear"}
    cfg = make_config("radauIIA5", opts, 1e-5, 1e-7, torch.float32)
    assert cfg.method is METHODS["radauIIA5"] and cfg.interp == "linear" and not cfg.adaptive
    assert cfg.control == ControlOptions(rtol=1e-5, atol=1e-7, max_num_steps=7)
    assert cfg.time == TimeOptions(grid=[0.0, 0.25, 0.5, 0.75, 1.0], jump_t=(0.5,), perturb=True,
                                   dtype=torch.float64)
    assert cfg.newton == NewtonOptions(tol=1e-6, max_iters=5, jacobian="dense")
    assert cfg.accel == AccelOptions()
    y0 = (torch.zeros(2), torch.zeros(3, 1))
    cfg = make_config("dopri5", {"first_step": 0.1, "safety": 0.8, "norm": "seminorm"}, 1e-6, 1e-8,
                      torch.float32, spec=StateSpec(y0))
    assert cfg.control == ControlOptions(rtol=1e-6, atol=1e-8, first_step=0.1, safety=0.8, seminorm=True,
                                         norm_splits=(2, 3))
    assert cfg.adaptive and cfg.time == TimeOptions(dtype=torch.float32)
    derived = cfg.with_control(first_step=None).replay([0.0, 1.0])
    assert cfg.control.first_step == 0.1 and cfg.time.grid is None and derived.time.grid == [0.0, 1.0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.control.rtol = 1.0  # type: ignore[misc]
