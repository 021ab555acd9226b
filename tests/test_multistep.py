"""Adams-Bashforth-Moulton methods (explicit_adams / implicit_adams / fixed_adams) and scipy_solver:
orders, the corrector, agreement with torchdiffeq, the integrate contract, gradients, errors."""
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import ODEFunc, fd_grad, flat_grad, mlp, rel_err

import pyode_bridge as pob
from pyode_bridge.solvers import METHODS, ControlOptions, SolverConfig, TimeOptions, adams_weights, integrate

pytest.importorskip("scipy")

ADAMS = ["explicit_adams", "implicit_adams"]
SCIPY_SOLVERS = ["RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"]
F64 = torch.float64


def exp_cos(t, y):
    return y * torch.cos(t)  # y = y0 exp(sin t)


def _adams_error(method, h, **options):
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the corrector must converge: a warning fails the test
        ys = pob.odeint(exp_cos, y0, t, method=method, rtol=1e-13, atol=1e-15,
                        options={"step_size": h, "max_iters": 50, **options})
    return abs(ys[-1].item() - math.exp(math.sin(2.0)))


# --- coefficients ----------------------------------------------------------------------------

def test_adams_weights_are_the_classical_constants_on_a_uniform_grid():
    np.testing.assert_allclose(adams_weights([0, -1, -2, -3]), np.array([55, -59, 37, -9]) / 24, rtol=1e-15)
    np.testing.assert_allclose(adams_weights([1, 0, -1, -2, -3]),
                               np.array([251, 646, -264, 106, -19]) / 720, rtol=1e-15)
    # torchdiffeq's highest orders (AB11 and AM12): first and last coefficients.
    ab11 = adams_weights([-j for j in range(11)])
    assert ab11[0] == pytest.approx(2132509567 / 479001600, rel=1e-14)
    assert ab11[-1] == pytest.approx(134211265 / 479001600, rel=1e-14)
    am12 = adams_weights([1] + [-j for j in range(11)])
    assert am12[0] == pytest.approx(262747265 / 958003200, rel=1e-14)
    assert am12[-1] == pytest.approx(5675265 / 958003200, rel=1e-14)


def test_adams_weights_integrate_the_interpolant_on_any_grid():
    """On uneven nodes, sum_j w_j p(x_j) = int_0^1 p for every polynomial of degree < k."""
    rng = np.random.default_rng(0)
    for k in (3, 7, 12):
        nodes = np.concatenate([[0.0], -np.cumsum(rng.uniform(0.3, 2.0, k - 1))])
        for x in (nodes, np.concatenate([[1.0], nodes])):
            w = np.array(adams_weights(x))
            for p in range(len(x)):
                # (bound: round-off of the check's own sum)
                assert abs(w @ x ** p - 1 / (p + 1)) < 1e-13 * (np.abs(w) @ np.abs(x) ** p + 1), (k, p)
    # Continuous across the uniform fast path: a 1e-9 perturbation moves the weights by ~1e-9.
    near = [0.0] + [-j - 1e-9 * (-1) ** j for j in range(1, 6)]
    np.testing.assert_allclose(adams_weights(near), adams_weights(range(0, -6, -1)), atol=1e-6)


# --- accuracy --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,max_order,hs,order", [
    ("explicit_adams", 12, [0.01, 0.005, 0.0025], 4),  # startup AB3 step bounds the order
    ("explicit_adams", 4, [0.02, 0.01, 0.005], 3),     # history capped at 3: AB3 throughout
    ("implicit_adams", 12, [0.02, 0.01, 0.005], 5),    # first corrector is of order 4 (local h^5)
    ("implicit_adams", 4, [0.02, 0.01, 0.005], 4),     # AM4 throughout
])
def test_adams_convergence_order(method, max_order, hs, order):
    errs = [_adams_error(method, h, max_order=max_order) for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.35, (slope, errs)
    assert METHODS[method].with_options({"max_order": max_order}).order == order


@pytest.mark.parametrize("method,max_order", [("explicit_adams", 6), ("implicit_adams", 12)])
def test_adams_keeps_its_order_on_an_uneven_grid(method, max_order):
    """Steps alternating h and 2h: the variable-step coefficients keep the order (torchdiffeq's
    constant ones drop to first order there). explicit_adams at max_order=6: Adams-Bashforth 11
    is unstable at these steps."""
    errs, hs = [], [0.02, 0.01, 0.005]
    for h in hs:
        steps = []
        while sum(steps) < 2.0 - 1e-12:
            steps.append(h if len(steps) % 2 == 0 else 2 * h)
        grid = np.concatenate([[0.0], np.cumsum(steps)])
        grid[-1] = 2.0
        y0, t = torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
        ys = pob.odeint(exp_cos, y0, t, method=method, rtol=1e-13, atol=1e-15,
                        options={"grid": grid.tolist(), "max_iters": 50, "max_order": max_order})
        errs.append(abs(ys[-1].item() - math.exp(math.sin(2.0))))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - METHODS[method].order) < 0.4, (slope, errs)


@pytest.mark.parametrize("method", ADAMS + ["fixed_adams"])
@pytest.mark.parametrize("reverse", [False, True])
def test_adams_matches_torchdiffeq(method, reverse):
    """Same scheme as torchdiffeq on a uniform grid: values to round-off and the same NFE."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    if reverse:
        t = t.flip(0)
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    counts = {"ours": 0, "theirs": 0, "exact": 0}

    def counted(key):
        def f(t, y):
            counts[key] += 1
            return torch.stack([y[1], -torch.sin(y[0])])
        return f

    opts = {"step_size": 0.05, "max_order": 8 if method == "explicit_adams" else 12}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq warns about its own corrector
        ours = pob.odeint(counted("ours"), y0, t, method=method, rtol=1e-6, atol=1e-8, options=opts)
        theirs = torchdiffeq.odeint(counted("theirs"), y0, t, method=method, rtol=1e-6, atol=1e-8,
                                    options=opts)
    if method == "explicit_adams":
        # Ours lowers the order where its top term outgrows the one below (here from Adams-
        # Bashforth 6, on the startup steps' errors): as accurate as torchdiffeq's (0.89x its
        # error forward, 1.3x reversed, where torchdiffeq's grid differs).
        exact = pob.odeint(counted("exact"), y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
        assert (ours - exact).abs().max() <= 1.5 * (theirs - exact).abs().max()
        assert (ours - theirs).abs().max().item() < 1e-5
    else:
        assert (ours - theirs).abs().max().item() < 1e-12
    if method == "explicit_adams":  # 2 rk4 steps (4 evaluations), then 1 per step
        assert counts["ours"] == 8 + (60 - 2)
    if not reverse:
        assert counts["ours"] == counts["theirs"]  # (reversed, torchdiffeq's step_size grid differs)


def _implicit_adams_reference(lam, h, n):
    """implicit_adams on y' = lam * y, y(0) = 1, with each corrector equation solved exactly
    (it is linear here): 2 rk4 steps, then Adams-Moulton on a history of up to 11 derivatives."""
    z = h * lam
    ys, hist = [1.0], []
    for _ in range(n):
        y = ys[-1]
        hist = [lam * y] + hist[:10]
        if len(hist) < 3:
            ys.append(y * (1 + z + z * z / 2 + z ** 3 / 6 + z ** 4 / 24))  # any 4-stage rk4 on y' = lam y
        else:
            w = adams_weights([1] + [-j for j in range(len(hist))])
            ys.append((y + h * sum(a * f for a, f in zip(w[1:], hist))) / (1 - z * w[0]))
    return torch.tensor(ys, dtype=F64)


def test_implicit_adams_corrector_converges_and_is_controlled_by_rtol_atol():
    lam, t = -1.3, torch.linspace(0.0, 2.0, 21, dtype=F64)
    ref = _implicit_adams_reference(lam, 0.1, 20)

    def solve(max_iters, rtol, atol=1e-300):
        stats = pob.SolveStats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ys = pob.odeint(lambda t, y: lam * y, torch.ones(1, dtype=F64), t, method="implicit_adams",
                            rtol=rtol, atol=atol, stats=stats, options={"max_iters": max_iters})
        warned = [str(w.message) for w in caught if "corrector" in str(w.message)]
        return (ys[:, 0] - ref).abs().max().item(), stats.nfe_forward, warned

    # Iterated to a tight tolerance, the corrector lands on the exact solution of its equations.
    dev, nfe_tight, warned = solve(100, 1e-15)
    assert dev < 1e-14 and not warned
    # One evaluation per step is far from it, and says so, naming the fix.
    dev, _, warned = solve(1, 1e-15)
    assert dev > 1e-7 and warned and "max_iters=1" in warned[0] and "raise options['max_iters']" in warned[0]
    # rtol/atol stop the iteration early: fewer evaluations, a deviation that follows them.
    dev_mid, nfe_mid, warned_mid = solve(100, 1e-6, 1e-9)
    dev_loose, nfe_loose, warned_loose = solve(100, 1e-3, 1e-6)
    assert not warned_mid and not warned_loose
    assert nfe_loose < nfe_mid < nfe_tight
    assert dev_mid < 1e-7 and dev_loose < 1e-4 and dev_mid < dev_loose


@pytest.mark.parametrize("max_order", [12, 8])
@pytest.mark.parametrize("h", [0.1, 0.05, 0.01])
def test_explicit_adams_at_its_default_order_is_stable(h, max_order):
    # Adams-Bashforth 11 (max_order 12, torchdiffeq's default) is unstable for h lambda outside
    # (-0.0034, 0): on y' = -0.7 y at h = 0.01, torchdiffeq's y(2.5) is off by 3e5.
    # Ours is as accurate as at max_order 6.
    y0, t = torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 2.5], dtype=F64)
    f = lambda t, y: -0.7 * y
    err = abs(pob.odeint(f, y0, t, method="explicit_adams", options={"step_size": h, "max_order": max_order})[-1].item()
              - math.exp(-0.7 * 2.5))
    low = abs(pob.odeint(f, y0, t, method="explicit_adams", options={"step_size": h, "max_order": 6})[-1].item()
              - math.exp(-0.7 * 2.5))
    assert err <= 1.5 * low and err < 0.05 * h ** 4  # global order 4 (the startup bounds it)


@pytest.mark.parametrize("perturb", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", ADAMS + ["fixed_adams"])
def test_adams_with_jump_t_against_the_analytic_solution(method, reverse, perturb):
    """y' = -0.7 y + k [t > 1], step 0.01, jump_t = [1]: y and dy/dk at the end (issue 16 #4:
    explicit_adams was 0.11 off, dy/dk -7.6 against -0.92)."""
    a, k_val, span = 0.7, 1.3, 1.5  # span: from the jump to t = 2.5
    k = torch.tensor(k_val, dtype=F64, requires_grad=True)
    f = lambda t, y: -a * y + k * (t > 1.0).to(y.dtype)
    settle = 1 - math.exp(-a * span)  # the forced part's growth from the jump to 2.5, over k / a
    if reverse:  # from the exact y(2.5) back to t = 0: y(0) = 1
        t = torch.tensor([2.5, 0.0], dtype=F64)
        y0 = torch.tensor([math.exp(-a * 2.5) + k_val / a * settle], dtype=F64)
        exact, d_exact = 1.0, -settle / a * math.exp(a * 2.5)
    else:
        t = torch.tensor([0.0, 2.5], dtype=F64)
        y0 = torch.tensor([1.0], dtype=F64)
        exact, d_exact = math.exp(-a * 2.5) + k_val / a * settle, settle / a
    ys = pob.odeint(f, y0, t, method=method, rtol=1e-10, atol=1e-12,
                    options={"step_size": 0.01, "jump_t": [1.0], "perturb": perturb, "max_iters": 20})
    g, = torch.autograd.grad(ys[-1].sum(), k)
    assert abs(ys[-1].item() / exact - 1) < 1e-8
    assert abs(g.item() / d_exact - 1) < 1e-8


def test_fixed_adams_is_implicit_adams():
    y0, t = torch.tensor([1.0], dtype=F64), torch.linspace(0.0, 1.0, 11, dtype=F64)
    a = pob.odeint(exp_cos, y0, t, method="fixed_adams")
    b = pob.odeint(exp_cos, y0, t, method="implicit_adams")
    assert torch.equal(a, b)


def test_adams_reverse_time_and_tuple_state():
    t = torch.linspace(2.0, 0.0, 5, dtype=F64)
    y0 = (torch.tensor([math.exp(math.sin(2.0))], dtype=F64), torch.tensor([[math.cos(2.0)]], dtype=F64))
    f = lambda t, y: (y[0] * torch.cos(t), -torch.sin(t).reshape(1, 1))
    for method in ADAMS:
        a, b = pob.odeint(f, y0, t, method=method, options={"step_size": 0.005})
        assert a.shape == (5, 1) and b.shape == (5, 1, 1)
        assert (a[:, 0] - torch.exp(torch.sin(t))).abs().max() < 1e-8
        assert (b[:, 0, 0] - torch.cos(t)).abs().max() < 1e-8


# --- the integrate contract (quadrature, on_step, counts) --------------------------------------

def _config(method, step_size=None, **options):
    return SolverConfig(METHODS[method].with_options(options), ControlOptions(rtol=1e-10, atol=1e-12),
                        TimeOptions(step_size=step_size))


@pytest.mark.parametrize("method,options", [("explicit_adams", {"max_order": 6}), ("implicit_adams", {}),
                                            ("scipy_solver", {"solver": "DOP853"}),
                                            ("scipy_solver", {"solver": "Radau"})])
def test_integrate_contract(method, options):
    """Outputs at t_eval (inside steps too), the quadrature q' = y alongside (never fed back),
    on_step with contiguous dense steps, step counts; dispatched by the one integrate()."""
    cfg = _config(method, None if method == "scipy_solver" else 0.01, **options)
    y0 = torch.tensor([1.0], dtype=F64)
    q0 = torch.tensor([0.5, 0.0], dtype=F64)
    rhs = lambda t, y: (y * math.cos(t), torch.cat([y, 2 * y]))
    steps = []
    t_eval = [0.0, 0.333, 1.0]
    res = integrate(rhs, y0, t_eval, cfg, q0=q0, on_step=steps.append)
    exact_y = [math.exp(math.sin(s)) for s in t_eval]
    for y, e in zip(res.ys, exact_y):
        assert abs(y.item() - e) < 1e-7
    from scipy.integrate import quad

    integral = quad(lambda s: math.exp(math.sin(s)), 0.0, 1.0, epsabs=1e-14)[0]
    assert abs(res.q_end[0].item() - (0.5 + integral)) < 1e-7
    assert abs(res.q_end[1].item() - 2 * integral) < 2e-7
    assert torch.equal(q0, torch.tensor([0.5, 0.0], dtype=F64))  # q0 not mutated
    assert res.steps == len(steps) == len(res.step_times) - 1
    assert steps[0].t0 == 0.0 and steps[-1].t1 == 1.0
    for a, b in zip(steps, steps[1:]):
        assert a.t1 == b.t0
    mid = steps[len(steps) // 2]
    tm = mid.t0 + 0.5 * mid.h
    assert abs(mid.evaluate(tm).item() - math.exp(math.sin(tm))) < 1e-7
    assert abs(mid.compact().evaluate(tm).item() - math.exp(math.sin(tm))) < 1e-7


@pytest.mark.parametrize("method", ADAMS)
def test_adams_stepper_attempt_leaves_its_history(method):
    """The loop retries a rejected step from the same state: an attempt changes nothing the next
    one sees (history, order cap, corrector record), even where explicit_adams lowers its order
    (y' = -0.7 y at h = 0.01: Adams-Bashforth 11 grows its top term) or the corrector fails."""
    from pyode_bridge.solvers import AdamsStepper

    cfg = _config(method, max_iters=1)
    y0 = torch.tensor([1.0, -2.0], dtype=F64)
    calls = []
    rhs = lambda t, y: calls.append(t) or -0.7 * y
    stepper = AdamsStepper(rhs, cfg.method, cfg, y0, None, None, cfg.control.atol, 0.0, 1.0, "forward solve")
    h, t = 0.01, 0.0
    lowered = failed = False
    for _ in range(40):
        before = (stepper.y, [list(x) for x in stepper.hist], stepper.cap, list(stepper.not_converged))
        a = stepper.attempt(t, t + h)
        n = len(calls)
        b = stepper.attempt(t, t + h)
        assert torch.equal(a.y_new, b.y_new) and a.hist[0] == b.hist[0] and a.cap == b.cap
        assert (stepper.y, [list(x) for x in stepper.hist], stepper.cap, stepper.not_converged) == before
        retry = calls[n:]  # the same evaluations once more, but the cached first derivative
        rk4 = len(stepper.hist[0]) < 2  # the step's history (with f0) is shorter than 3
        assert retry == calls[n - len(retry):n]
        assert len(retry) == (3 if rk4 else 0 if method == "explicit_adams" else 1)  # max_iters=1
        lowered |= a.cap < stepper.cap
        failed |= not a.converged
        stepper.accept(b)
        t += h
    assert lowered if method == "explicit_adams" else failed


# --- Adams gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ADAMS)
def test_adams_gradients(method):
    """Backprop through Adams steps equals finite differences; every adjoint method agrees with
    backprop (to the discretization error); checkpointed refuses with a clear error."""
    func = ODEFunc(mlp(hidden=8))
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.43, 1.0], dtype=F64)  # 0.43 is inside a step: dense output
    params = [y0] + list(func.parameters())
    opts = {"step_size": 0.05}

    def loss(sensitivity="backprop"):
        return (pob.odeint(func, y0, t, method=method, options=opts, sensitivity=sensitivity) ** 2).sum()

    g_bp = flat_grad(loss(), params)
    assert rel_err(g_bp, fd_grad(loss, params)) < 1e-7
    for sens in ["backsolve", "interpolated", "interpolating", pob.Interpolating(checkpointing=True)]:
        assert rel_err(flat_grad(loss(sens), params), g_bp) < 2e-5, sens
    with pytest.raises(ValueError, match="checkpointed.*does not support method.*interpolated"):
        loss("checkpointed")


# --- scipy_solver ----------------------------------------------------------------------------

def _linear_exact(t, dtype):
    """y = (exp(-s), sin s, cos s) for s = t - t0, as a tuple (tensor (2,), tensor (1, 1))."""
    s = t - t[0]
    return torch.stack([torch.exp(-s), torch.sin(s)], 1).to(dtype), torch.cos(s).reshape(-1, 1, 1).to(dtype)


def _linear_rhs(t, y):
    z, w = y
    return torch.stack([-z[0], w[0, 0]]), -z[1].reshape(1, 1)


@pytest.mark.parametrize("solver", SCIPY_SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_scipy_solver_against_exact_solution(solver, dtype, reverse):
    t = torch.linspace(0.0, 3.0, 7, dtype=dtype)
    if reverse:
        t = t.flip(0) + 1.0  # from 4 back to 1
    ez, ew = _linear_exact(t.double(), dtype)
    y0 = (ez[0].clone(), ew[0].clone())
    tol = 1e-9 if dtype == F64 else 1e-6
    z, w = pob.odeint(_linear_rhs, y0, t, method="scipy_solver", rtol=tol, atol=tol,
                      options={"solver": solver})
    assert z.dtype == dtype and w.dtype == dtype and z.shape == (7, 2) and w.shape == (7, 1, 1)
    bound = 5e-6 if dtype == F64 else 5e-4  # BDF/LSODA keep the global error ~100 x tol
    assert (z - ez).abs().max().item() < bound
    assert (w - ew).abs().max().item() < bound


@pytest.mark.parametrize("solver", SCIPY_SOLVERS)
def test_scipy_adjoint_gradient_matches_dopri5_backprop(solver):
    """odeint_adjoint(method='scipy_solver') solves the adjoint (and the parameter integral) with
    scipy too; at tight tolerances it agrees with backprop through dopri5."""
    func = ODEFunc(mlp(hidden=8))
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    params = [y0] + list(func.parameters())

    def loss(method, sensitivity, options=None):
        ys = pob.odeint(func, y0, t, method=method, options=options, sensitivity=sensitivity,
                        rtol=1e-10, atol=1e-10)
        return (ys ** 2).sum()

    g_ref = flat_grad(loss("dopri5", "backprop"), params)
    g = flat_grad(loss("scipy_solver", "backsolve", {"solver": solver}), params)
    assert rel_err(g, g_ref) < 1e-6
    if solver in ("DOP853", "LSODA"):
        for sens in ["interpolated", "interpolating", pob.Interpolating(checkpointing=True)]:
            assert rel_err(flat_grad(loss("scipy_solver", sens, {"solver": solver}), params), g_ref) < 1e-6


def test_scipy_solver_refuses_backprop_clearly():
    func = ODEFunc(mlp(hidden=4))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    # Inputs that require grad: the forward still runs (torchdiffeq's tests call it so) ...
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    ys = pob.odeint(func, y0, t, method="scipy_solver")
    ref = pob.odeint(func, y0.detach(), t, method="dopri5", rtol=1e-10, atol=1e-10)
    assert (ys.detach() - ref).abs().max() < 1e-5
    # ... but a gradient through it is an error naming the adjoint methods, never a silent zero.
    with pytest.raises(ValueError, match="forward only.*backsolve"):
        ys.sum().backward()
    ys = pob.odeint(func, y0.detach(), t, method="scipy_solver")  # only the parameters need grad
    with pytest.raises(ValueError, match="forward only.*odeint_adjoint"):
        torch.autograd.grad(ys.sum(), list(func.parameters()))
    with pytest.raises(ValueError, match="checkpointed.*scipy_solver"):
        pob.odeint(func, y0, t, method="scipy_solver", sensitivity="checkpointed")
    with torch.no_grad():  # nothing needs a gradient: a plain tensor
        assert pob.odeint(func, y0, t, method="scipy_solver").grad_fn is None


def test_scipy_solver_option_errors():
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"unknown scipy solver.*'rk45'.*\['RK45', 'RK23'"):
        pob.odeint(lambda t, y: -y, y0, t, method="scipy_solver", options={"solver": "rk45"})
    with pytest.raises(ValueError, match="min_step.*only used by scipy's 'LSODA'"):
        pob.odeint(lambda t, y: -y, y0, t, method="scipy_solver", options={"solver": "RK45", "min_step": 0.1})
    with pytest.raises(ValueError, match="valid options"):
        pob.odeint(lambda t, y: -y, y0, t, method="scipy_solver", options={"step_size": 0.1})
    with pytest.raises(ValueError, match="valid methods.*scipy_solver"):
        pob.odeint(lambda t, y: -y, y0, t, method="scipy")


def test_scipy_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.integrate", None)  # makes `import scipy.integrate` fail
    with pytest.raises(ImportError, match="needs scipy.*pip install scipy"):
        pob.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="scipy_solver")
    pob.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))  # the rest works without it


def test_adams_option_errors():
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    for options, match in [({"max_iters": 0}, "max_iters.*positive"), ({"max_order": 13}, "max_order.*1 to 12"),
                           ({"solver": "RK45"}, "valid options"), ({"first_step": 0.1}, "valid options")]:
        with pytest.raises(ValueError, match=match):
            pob.odeint(lambda t, y: -y, y0, t, method="implicit_adams", options=options)


@pytest.mark.parametrize("method,options", [("explicit_adams", {"step_size": 0.05}),
                                            ("implicit_adams", {"step_size": 0.05}),
                                            ("scipy_solver", {"solver": "RK45"}),
                                            ("scipy_solver", {"solver": "LSODA"})])
def test_solver_errors_name_time_and_method(method, options):
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    g = lambda t, y: -y if t < 0.5 else y * float("nan")
    with pytest.raises(pob.SolverError, match=rf"forward solve with method '{method}'.*NaN/Inf.*t=0\.5"):
        pob.odeint(g, y0, t, method=method, options=options)
    with pytest.raises(pob.SolverError, match=rf"method '{method}'.*max_num_steps=3"):
        pob.odeint(lambda t, y: torch.cos(40 * t) * y, y0, t, method=method,
                   options={**options, "max_num_steps": 3})


@pytest.mark.parametrize("method", ["implicit_adams", "rk4"])
def test_nan_named_at_the_step_that_made_it_not_at_a_later_output(method):
    """The CPU's NaN/Inf checks of fixed steps are grouped; an output time inside a later step
    (0.52) whose dense output is NaN still names the step that made the state NaN: the corrector's
    (rk4's last stage's) evaluation at t = 0.5 ends the step from 0.45."""
    g = lambda t, y: -y if t < 0.5 else y * float("nan")
    with pytest.raises(pob.SolverError, match=r"the state became NaN/Inf between t=0\.45 and t=0\.5;"):
        pob.odeint(g, torch.ones(2, dtype=F64), torch.tensor([0.0, 0.52, 1.0], dtype=F64), method=method,
                   options={"step_size": 0.05})


def test_adams_nan_found_by_the_one_final_check_off_the_cpu():
    """Off the CPU the per-step checks are skipped (no host sync); the checks at the end still
    report NaN/Inf (exercised here on the CPU by turning the per-step checks off)."""
    cfg = _config("explicit_adams", 0.05)
    g = lambda t, y: -y if t < 0.5 else y * float("nan")
    with pytest.raises(pob.SolverError, match="method 'explicit_adams'.*became NaN/Inf between t="):
        integrate(g, torch.ones(2, dtype=F64), [0.0, 0.3, 1.0], cfg, check_finite_every_step=False)


@pytest.mark.cuda
@pytest.mark.parametrize("method,sens", [("explicit_adams", "backprop"), ("implicit_adams", "backprop"),
                                         ("implicit_adams", "interpolating"), ("scipy_solver", "backsolve"),
                                         ("scipy_solver", "interpolated")])
def test_cuda_matches_cpu(method, sens):
    def run(device):
        func = ODEFunc(mlp(hidden=8)).to(device)
        y0 = torch.tensor([[0.5, -0.3], [0.1, 0.2]], dtype=F64, device=device, requires_grad=True)
        t = torch.tensor([0.0, 0.43, 1.0], dtype=F64, device=device)
        opts = {"solver": "DOP853"} if method == "scipy_solver" else {"step_size": 0.05}
        ys = pob.odeint(func, y0, t, method=method, options=opts, sensitivity=sens, rtol=1e-9, atol=1e-9)
        assert ys.device.type == device
        return ys.detach().cpu(), flat_grad((ys ** 2).sum(), [y0] + list(func.parameters())).cpu()

    (ys_cpu, g_cpu), (ys_gpu, g_gpu) = run("cpu"), run("cuda")
    torch.testing.assert_close(ys_gpu, ys_cpu, rtol=1e-9, atol=1e-9)
    assert rel_err(g_gpu, g_cpu) < 1e-7


def test_scipy_implicit_solvers_handle_a_stiff_problem():
    """y0' = -1e5 (y0 - cos t): RK45 needs a step below 3e-5 throughout, the implicit solvers do not."""
    f = lambda t, y: torch.stack([-1e5 * (y[0] - torch.cos(t)), -y[1]])
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 10.0], dtype=F64)
    opts = {"max_num_steps": 500}
    with pytest.raises(pob.SolverError, match="max_num_steps=500.*try options=\\{'solver': 'Radau'\\}"):
        pob.odeint(f, y0, t, method="scipy_solver", rtol=1e-6, atol=1e-8, options={**opts, "solver": "RK45"})
    for solver in ("Radau", "BDF", "LSODA"):
        ys = pob.odeint(f, y0, t, method="scipy_solver", rtol=1e-6, atol=1e-8, options={**opts, "solver": solver})
        # slow manifold y0 = cos t + sin t / 1e5 + O(1e-10); y1 = exp(-t)
        assert abs(ys[-1, 0].item() - (math.cos(10.0) + math.sin(10.0) * 1e-5)) < 1e-5, solver
        assert abs(ys[-1, 1].item() - math.exp(-10.0)) < 1e-6, solver
