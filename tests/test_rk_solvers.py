"""The Runge-Kutta methods added for torchdiffeq parity: dopri8 (with its 7th-order dense output),
fehlberg2, heun2, heun3, and the fixed-step implicit methods (Newton on the stage equations,
gradients by the implicit function theorem)."""
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import ODEFunc, fd_grad, mlp, rel_err

import pyode_bridge as pob
from pyode_bridge.solvers import IMPLICIT, TABLEAUX

F64 = torch.float64


def _riccati(t, y):
    """y' = y^2 cos t: nonlinear and non-autonomous, y(t) = 1 / (1 / y0 - sin t)."""
    return y * y * torch.cos(t)


def _riccati_exact(t, y0=0.5):
    return 1.0 / (1.0 / y0 - math.sin(t))


# ------------------------------------------------------------------------------------------------
# Convergence orders
# ------------------------------------------------------------------------------------------------

FIXED_ORDERS = {"heun2": 2, "heun3": 3, **{m: TABLEAUX[m].order for m in IMPLICIT}}


@pytest.mark.parametrize("method", sorted(FIXED_ORDERS))
def test_fixed_step_convergence_order(method):
    """Slope of log(error) against log(h) on the Riccati problem equals the order."""
    order = FIXED_ORDERS[method]
    hs = [0.2, 0.1, 0.05] if order >= 4 else [0.1, 0.05, 0.025]
    y0 = torch.tensor([0.5], dtype=F64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)  # on every grid: no interpolation error
    errs = []
    for h in hs:
        # Tight tolerances only tighten Newton's iteration (to round-off): the error is the method's.
        ys = pob.odeint(_riccati, y0, t, method=method, options={"step_size": h}, rtol=1e-12, atol=1e-14)
        errs.append(max(abs(ys[i].item() - _riccati_exact(t[i].item())) for i in (1, 2)))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errs)


def test_heun_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    net = mlp(dim=2, hidden=16, seed=1)
    f = lambda t, y: net(y)
    y0 = torch.randn(8, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 6, dtype=F64)
    for method in ("heun2", "heun3"):
        kw = dict(method=method, options={"step_size": 0.01})
        torch.testing.assert_close(pob.odeint(f, y0, t, **kw), torchdiffeq.odeint(f, y0, t, **kw),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,tols,bound", [("dopri8", (1e-5, 1e-7, 1e-9, 1e-11), 3.0),
                                               ("fehlberg2", (1e-4, 1e-5, 1e-6), 300.0)])
def test_adaptive_error_is_proportional_to_the_tolerance(method, tols, bound):
    """The global error at output times (mostly between steps) on the Riccati problem over three
    periods stays within ``bound`` times the tolerance and shrinks with it (log-log slope near 1).
    fehlberg2's bound is loose by nature: its error estimate is the difference of two weights
    of 1/512 (torchdiffeq's fehlberg2 has the same errors, checked below)."""
    t = torch.linspace(0.0, 6.0, 13, dtype=F64)
    exact = np.array([_riccati_exact(x) for x in t.tolist()])
    errs = []
    for tol in tols:
        ys = pob.odeint(_riccati, torch.tensor([0.5], dtype=F64), t, method=method, rtol=tol, atol=tol)
        errs.append(np.abs(ys[:, 0].numpy() - exact).max())
        assert errs[-1] < bound * tol, (tol, errs[-1])
    slope = np.polyfit(np.log(tols), np.log(errs), 1)[0]
    assert 0.7 < slope < 1.3, (slope, errs)


def test_fehlberg2_and_dopri8_against_torchdiffeq():
    """Same tableaux as torchdiffeq: fehlberg2 as accurate as theirs; dopri8 more accurate at the
    output times (their quartic interpolant versus our 7th-order continuous extension)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = torch.linspace(0.0, 6.0, 13, dtype=F64)
    exact = np.array([_riccati_exact(x) for x in t.tolist()])
    y0 = torch.tensor([0.5], dtype=F64)
    for method, tol, factor in (("fehlberg2", 1e-6, 2.0), ("dopri8", 1e-9, 0.05)):
        ours = pob.odeint(_riccati, y0, t, method=method, rtol=tol, atol=tol)
        theirs = torchdiffeq.odeint(_riccati, y0, t, method=method, rtol=tol, atol=tol)
        err_ours = np.abs(ours[:, 0].numpy() - exact).max()
        err_theirs = np.abs(theirs[:, 0].numpy() - exact).max()
        assert err_ours < factor * err_theirs, (method, err_ours, err_theirs)


def _lotka(t, y):
    return torch.stack([y[0] * (1.5 - y[1]), y[1] * (y[0] - 3.0) + 0.1 * torch.sin(t)])


@pytest.mark.parametrize("tol", [1e-8, 1e-11])
def test_dopri8_dense_output_is_as_accurate_as_the_step_ends(tol):
    """Outputs strictly inside steps come from the 7th-order continuous extension: their error is
    that of the step ends (a 4th-order interpolant of the same steps would be ~100x worse at
    tol=1e-11)."""
    from scipy.integrate import solve_ivp

    from pyode_bridge._state import FlatRHS, StateSpec
    from pyode_bridge.solvers import ControlOptions, SolverConfig, integrate
    y0 = torch.tensor([1.0, 1.0], dtype=F64)
    rhs = FlatRHS(_lotka, StateSpec(y0), F64, "dopri8")
    cfg = SolverConfig(TABLEAUX["dopri8"], ControlOptions(rtol=tol, atol=tol))
    ends = integrate(rhs, y0, [0.0, 10.0], cfg).step_times
    ends = torch.tensor(ends, dtype=F64)
    inner = ends[:-1] + 0.37 * (ends[1:] - ends[:-1])  # one output inside every step
    t_out = torch.cat([ends[:1], inner, ends[-1:]])
    ref = solve_ivp(lambda t, y: _lotka(torch.tensor(t), torch.from_numpy(y)).numpy(), (0.0, 10.0),
                    [1.0, 1.0], method="DOP853", rtol=1e-13, atol=1e-14, dense_output=True).sol
    ys = pob.odeint(_lotka, y0, t_out, method="dopri8", rtol=tol, atol=tol)
    err_inner = np.abs(ys[1:-1].numpy() - ref(t_out[1:-1].numpy()).T).max()
    ye = pob.odeint(_lotka, y0, ends, method="dopri8", rtol=tol, atol=tol)  # the same steps
    err_ends = np.abs(ye.numpy() - ref(ends.numpy()).T).max()
    assert err_inner < 2 * err_ends + 0.1 * tol, (err_inner, err_ends)


def test_dopri8_dense_output_order_on_a_grid():
    """On a fixed grid (no error control) the interior outputs converge at the interpolant's
    order: local error h^8, so a log-log slope near 8."""
    f = lambda t, y: y * torch.cos(t)
    y0 = torch.tensor([1.0], dtype=F64)
    errs, hs = [], [0.8, 0.4, 0.2]
    for h in hs:
        grid = torch.arange(0.0, 4.0 + 1e-12, h, dtype=F64)
        inner = grid[:-1] + 0.37 * h
        t_out = torch.cat([grid[:1], inner, grid[-1:]])
        ys = pob.odeint(f, y0, t_out, method="dopri8", options={"grid": grid})
        errs.append((ys[1:-1, 0] - torch.exp(torch.sin(t_out[1:-1]))).abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert slope > 7.3, (slope, errs)


def test_dopri8_dense_stages_are_evaluated_only_for_steps_with_outputs():
    f = lambda t, y: -y + torch.sin(3 * t)
    y0 = torch.ones(3, dtype=F64)
    s1, s2 = pob.SolveStats(), pob.SolveStats()
    kw = dict(rtol=1e-8, atol=1e-8, method="dopri8")
    few = pob.odeint(f, y0, torch.tensor([0.0, 4.0], dtype=F64), stats=s1, **kw)
    many = pob.odeint(f, y0, torch.linspace(0.0, 4.0, 200, dtype=F64), stats=s2, **kw)
    assert s1.steps_forward == s2.steps_forward
    # 13 evaluations per step (FSAL), + 5 dense stages for every step holding an inner output.
    assert s1.nfe_forward == 13 * (s1.steps_forward + s1.steps_rejected) + 2
    assert s2.nfe_forward == s1.nfe_forward + 5 * s1.steps_forward
    torch.testing.assert_close(few[-1], many[-1], rtol=0, atol=0)


# The collocation methods' dense output is their collocation polynomial, of degree s (the implicit
# stages), accurate to order min(s + 1, order) between steps.
COLLOCATION_DENSE_ORDERS = {"radauIIA3": 3, "radauIIA5": 4, "gl4": 3, "gl6": 4}


@pytest.mark.parametrize("method", sorted(COLLOCATION_DENSE_ORDERS))
def test_collocation_dense_output_order_on_a_grid(method):
    f = lambda t, y: y * torch.cos(t)
    y0 = torch.tensor([1.0], dtype=F64)
    errs, hs = [], [0.4, 0.2, 0.1]
    for h in hs:
        grid = torch.arange(0.0, 4.0 + 1e-12, h, dtype=F64)
        inner = torch.cat([grid[:-1] + 0.37 * h, grid[:-1] + 0.81 * h]).sort().values
        t_out = torch.cat([grid[:1], inner, grid[-1:]])
        ys = pob.odeint(f, y0, t_out, method=method, options={"grid": grid}, rtol=1e-12, atol=1e-14)
        errs.append((ys[1:-1, 0] - torch.exp(torch.sin(t_out[1:-1]))).abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - COLLOCATION_DENSE_ORDERS[method]) < 0.4, (slope, errs)


@pytest.mark.parametrize("method", sorted(COLLOCATION_DENSE_ORDERS))
def test_collocation_dense_output_holds_the_stages(method):
    """At t0 + c_i h the dense output is the stage value y0 + h sum_j a_ij K_j (cubic Hermite is
    not: on a stiff step it misses them by far more than the step's error)."""
    from pyode_bridge.solvers import ControlOptions, SolverConfig, TimeOptions, integrate

    tab = TABLEAUX[method]
    steps = []
    integrate(lambda t, y: -LAM * (y - math.cos(t)), torch.zeros(1, dtype=F64), [0.0, 0.3],
              SolverConfig(tab, ControlOptions(rtol=1e-12, atol=1e-14), TimeOptions(step_size=0.1)),
              on_step=steps.append)
    for st in steps:
        for c, row in zip(tab.c[1:], tab.a[1:]):
            stage = st.y0 + st.h * sum(a * k for a, k in zip(row, st.ks))
            torch.testing.assert_close(st.evaluate(st.t0 + c * st.h), stage, rtol=1e-12, atol=1e-12)


def _robertson(t, y):
    return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2])


def test_interpolating_on_robertson_reads_z_from_the_collocation_polynomial():
    """Robertson's kinetics at step 0.05: the first step holds the whole initial transient of y2
    (up to 3.6e-5 within 1e-3). Cubic Hermite extrapolates f(y0) (y2' = 0.04) over it, ten times
    y2's size, and the adjoint's Jacobian (through 6e7 y2) with it: dL/dy0 was 5% off the discrete
    gradient. From the collocation polynomial: 8e-4, and interpolating's guard is quiet; with
    cubic Hermite asked for (interp="cubic") it warns."""
    t = torch.tensor([0.0, 1.0, 10.0], dtype=F64)
    w = torch.tensor([1.0, 1e4, 1.0], dtype=F64)

    def grad(sensitivity, **options):
        y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
        ys = pob.odeint(_robertson, y0, t, method="radauIIA5", options={"step_size": 0.05, **options},
                        sensitivity=sensitivity)
        return torch.autograd.grad((ys[1:] * w).sum(), y0)[0]

    ref = grad("backprop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(grad("interpolating"), ref) < 3e-3
    with pytest.warns(RuntimeWarning, match=r"\(interpolating\): the dense output"):
        assert rel_err(grad("interpolating", interp="cubic"), ref) > 0.01


# ------------------------------------------------------------------------------------------------
# Stiffness
# ------------------------------------------------------------------------------------------------

LAM = 1000.0


def _stiff(t, y):
    return -LAM * (y - torch.cos(t))


def _stiff_exact(t):
    c = LAM / (1 + LAM**2)
    return LAM * c * math.cos(t) + c * math.sin(t) - LAM * c * math.exp(-LAM * t)


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_methods_are_accurate_where_explicit_ones_blow_up(method):
    """h * lambda = 10: far outside any explicit method's stability region."""
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ys = pob.odeint(_stiff, y0, t, method=method, options={"step_size": 0.01})
    assert abs(ys[-1].item() - _stiff_exact(2.0)) < 1e-5
    with pytest.raises(pob.SolverError, match="NaN/Inf"):
        pob.odeint(_stiff, y0, t, method="rk4", options={"step_size": 0.01})


def test_adaptive_explicit_method_needs_many_steps_where_radau_needs_few():
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    with pytest.raises(pob.SolverError, match="max_num_steps"):
        pob.odeint(_stiff, y0, t, method="dopri5", rtol=1e-6, atol=1e-6, options={"max_num_steps": 1000})
    stats = pob.SolveStats()
    ys = pob.odeint(_stiff, y0, t, method="radauIIA5", options={"step_size": 0.1}, stats=stats)
    assert stats.steps_forward == 100
    assert abs(ys[-1].item() - _stiff_exact(10.0)) < 1e-7


def _stability_function(tab, z):
    """R(z) = 1 + z b^T (I - z A)^{-1} 1: one step of y' = lambda y multiplies y by R(h lambda)."""
    S = tab.stages
    A = np.zeros((S, S))
    for i, row in enumerate(tab.a):
        A[i, :len(row)] = row
    return 1.0 + z * np.array(tab.b) @ np.linalg.solve(np.eye(S) - z * A, np.ones(S))


L_STABLE = ("implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2")


@pytest.mark.parametrize("method", IMPLICIT)
def test_a_and_l_stability(method):
    """One step of y' = -1000 y with h = 0.5 multiplies y by R(-500): never grows (A-stable);
    L-stable methods damp it to almost nothing, the others (trapezoid, Gauss) keep |R| near 1."""
    tab = TABLEAUX[method]
    y0 = torch.ones(1, dtype=F64)
    ys = pob.odeint(lambda t, y: -LAM * y, y0, torch.tensor([0.0, 0.5], dtype=F64), method=method,
                    options={"step_size": 0.5}, rtol=1e-12, atol=1e-14)
    R = _stability_function(tab, -500.0)
    assert abs(ys[-1].item() - R) < 1e-12 * max(1.0, abs(R))
    for z in (-1e-2, -1.0, -1e2, -1e4, complex(-1.0, 50.0), complex(-1e-3, 1e3)):
        assert abs(_stability_function(tab, z)) <= 1.0 + 1e-12, z
    if method in L_STABLE:
        assert abs(R) < 1e-2
    else:  # |R(z)| -> 1 as z -> -inf: the stiff component is hardly damped
        assert abs(R) > 0.95


# ------------------------------------------------------------------------------------------------
# Newton's method: failure, options, float32, Krylov
# ------------------------------------------------------------------------------------------------

def test_newton_failure_is_a_solver_error_naming_t_method_and_fix():
    # K = (1 + h K)^2 has no real solution for h = 0.9: Newton cannot converge.
    y0 = torch.ones(1, dtype=F64)
    with pytest.raises(pob.SolverError, match=r"method 'implicit_euler'.*Newton.*t=0 to t=0\.9.*step_size"):
        pob.odeint(lambda t, y: y**2, y0, torch.tensor([0.0, 0.9], dtype=F64), method="implicit_euler",
                   options={"step_size": 0.9})
    # The same solve on a fine grid is fine (y = 1 / (1 - t)).
    ys = pob.odeint(lambda t, y: y**2, y0, torch.tensor([0.0, 0.5], dtype=F64), method="radauIIA5",
                    options={"step_size": 0.05})
    assert abs(ys[-1].item() - 2.0) < 1e-6
    with pytest.raises(pob.SolverError, match=r"did not converge in 1 iterations.*max_newton_iters"):
        pob.odeint(_riccati, torch.tensor([0.5], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                   method="gl4", options={"step_size": 0.1, "max_newton_iters": 1})


def test_newton_options_are_validated():
    y0, t = torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="valid options"):
        pob.odeint(lambda t, y: -y, y0, t, method="rk4", options={"newton_tol": 1e-3})
    for bad in ({"newton_tol": -1.0}, {"max_newton_iters": 0}, {"jacobian": "exact"}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            pob.odeint(lambda t, y: -y, y0, t, method="radauIIA5", options=bad)


def test_time_varying_jacobian_falls_back_to_full_newton():
    """df/dy = 2/t changes by a factor 1.8 over a step: Newton with one Jacobian per step
    diverges, full Newton (Jacobians at the stage points) converges to the trapezoidal rule's
    solution, y1 = y0 + h/2 (f(t0, y0) + f(t1, y1))."""
    f = lambda t, y: 2 * y / t + t**4 * torch.sin(2 * t) - t**2 + 4 * t**3
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.linspace(1.0, 8.0, 10, dtype=F64)
    ys = pob.odeint(f, y0, t, method="trapezoid")  # steps on t itself: h = 0.78
    for n in range(len(t) - 1):
        h = t[n + 1] - t[n]
        rule = ys[n] + h / 2 * (f(t[n], ys[n]) + f(t[n + 1], ys[n + 1]))
        assert abs(ys[n + 1] - rule).item() < 1e-9 * abs(ys[n + 1]).item()


@pytest.mark.parametrize("method", ["radauIIA5", "trbdf2", "gl6"])
def test_float32(method):
    """Newton's tolerance respects float32's resolution: the float32 solve converges and agrees
    with the float64 one to float32 accuracy."""
    f = lambda t, y: y * torch.cos(t)
    kw = dict(method=method, options={"step_size": 0.05})
    ys = pob.odeint(f, torch.ones(2), torch.tensor([0.0, 2.0]), **kw)
    y64 = pob.odeint(f, torch.ones(2, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), **kw)
    assert ys.dtype == torch.float32
    assert (ys[-1].double() - y64[-1]).abs().max().item() < 1e-5


def test_krylov_matches_dense():
    """Matrix-free Newton (JVPs + GMRES) and the IFT backward (VJPs + GMRES) give the dense
    method's solution and gradient."""
    net = mlp(dim=3, hidden=8, seed=1)
    func = ODEFunc(net)
    y0 = torch.tensor([0.5, -0.3, 0.2], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    for method in ("radauIIA5", "trbdf2"):
        out = []
        for jac in ("dense", "krylov"):
            ys = pob.odeint(func, y0, t, method=method, options={"step_size": 0.1, "jacobian": jac},
                            rtol=1e-10, atol=1e-12)
            g = torch.autograd.grad(ys.pow(2).sum(), [y0] + list(net.parameters()))
            out.append((ys.detach(), torch.cat([x.reshape(-1) for x in g])))
        torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-12)
        assert rel_err(out[1][1], out[0][1]) < 1e-9


def test_large_state_uses_krylov_and_tuple_states_work():
    torch.manual_seed(0)
    W = -torch.eye(100, dtype=F64) * 50 + 0.1 * torch.randn(100, 100, dtype=F64)
    f = lambda t, y: (y[0] @ W.T, y[0].sum().reshape(1))
    y0 = (torch.randn(100, dtype=F64), torch.zeros(1, dtype=F64))
    t = torch.tensor([0.0, 0.2], dtype=F64)
    z, s = pob.odeint(f, y0, t, method="sdirk2", options={"step_size": 0.05})  # auto: N=101 -> krylov
    zd, sd = pob.odeint(f, y0, t, method="sdirk2", options={"step_size": 0.05, "jacobian": "dense"})
    torch.testing.assert_close(z, zd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s, sd, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------

def _mlp_problem():
    net = mlp(dim=2, hidden=4, seed=0)
    y0 = torch.tensor([0.5, -0.3], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=F64)
    return ODEFunc(net), y0, t, [y0] + list(net.parameters())


def _loss(func, y0, t, method, h, sensitivity="backprop", **kw):
    ys = pob.odeint(func, y0, t, method=method, options={"step_size": h}, rtol=1e-10, atol=1e-12,
                    sensitivity=sensitivity, **kw)
    return (ys**2).sum() + ys[1:].sum()  # outputs inside steps too (dense output)


def _flat_grad(loss, inputs):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs)])


@pytest.mark.parametrize("method", IMPLICIT)
def test_implicit_gradients_match_finite_differences_and_checkpointed(method):
    func, y0, t, inputs = _mlp_problem()
    h = 0.15  # output times fall inside steps: the dense output is differentiated too
    g = _flat_grad(_loss(func, y0, t, method, h), inputs)
    fd = fd_grad(lambda: _loss(func, y0, t, method, h), inputs, eps=1e-6)
    assert rel_err(g, fd) < 1e-7
    g_ck = _flat_grad(_loss(func, y0, t, method, h, "checkpointed"), inputs)
    torch.testing.assert_close(g_ck, g, rtol=1e-12, atol=1e-14)


def test_ift_gradient_on_a_stiff_problem():
    """With h * lambda = 100 the gradient of the converged stages (not of Newton's iterates)
    matches finite differences of the discrete solve, for a parameter and the initial state."""
    p = torch.tensor(1.3, dtype=F64, requires_grad=True)
    y0 = torch.tensor([0.2], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    for method in ("radauIIA5", "sdirk2", "gl4"):
        loss = lambda: pob.odeint(lambda tt, y: -LAM * (y - p * torch.cos(tt)) - y**3, y0, t, method=method,
                                  options={"step_size": 0.1}, rtol=1e-11, atol=1e-13).sum()
        g = _flat_grad(loss(), [p, y0])
        assert rel_err(g, fd_grad(loss, [p, y0], eps=1e-6)) < 1e-7, method


# A piecewise-cubic (Hermite) trajectory is no polynomial: interpolated's guard rightly says its
# Chebyshev interpolant misses it by more than rtol=1e-10; the gradient still converges.
@pytest.mark.filterwarnings("ignore:.*Chebyshev interpolant:RuntimeWarning")
@pytest.mark.parametrize("sensitivity", ["interpolating", "interpolated", "backsolve"])
@pytest.mark.parametrize("method", ["radauIIA3", "trbdf2"])
def test_adjoint_gradients_converge_to_backprop(method, sensitivity):
    """Adjoint methods solve the continuous adjoint with the same implicit method: their gradient
    differs from the discrete one by the discretisation error, which falls at the method's order."""
    func, y0, t, inputs = _mlp_problem()
    order = TABLEAUX[method].order
    hs, errs = [0.2, 0.1, 0.05], []
    for h in hs:
        g = _flat_grad(_loss(func, y0, t, method, h), inputs)
        kw = {"sensitivity": pob.Backsolve(on_instability="ignore")} if sensitivity == "backsolve" else {}
        g_adj = _flat_grad(_loss(func, y0, t, method, h, kw.pop("sensitivity", sensitivity)), inputs)
        errs.append(rel_err(g_adj, g))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert slope > order - 0.5, (slope, errs)
    assert errs[-1] < 1e-4


def test_double_backward_through_newton_is_refused():
    func, y0, t, inputs = _mlp_problem()
    loss = _loss(func, y0, t, "radauIIA3", 0.1)
    with pytest.raises(RuntimeError, match="higher-order gradients"):
        torch.autograd.grad(loss, y0, create_graph=True)


def test_a_tableau_must_start_with_f_of_t_y():
    with pytest.raises(ValueError, match=r"first stage must be f\(t, y\)"):
        pob.ButcherTableau(name="radau1", order=1, c=(1.0,), a=((1.0,),), b=(1.0,))
    with pytest.raises(ValueError, match="one entry per stage"):
        pob.ButcherTableau(name="bad", order=1, c=(0.0, 1.0), a=((),), b=(1.0,))


def test_an_adaptive_tableau_needs_its_error_order():
    # The controller's exponents come from error_order: without it the solve used to fail deep in
    # the loop with a TypeError; now the tableau is refused where it is made.
    heun = dict(name="heun_euler", order=2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), b_err=(-0.5, 0.5))
    with pytest.raises(ValueError, match="needs error_order"):
        pob.ButcherTableau(**heun)
    tab = pob.ButcherTableau(**heun, error_order=2)
    with pytest.raises(ValueError, match="has no continuous extension"):
        tab.dense_weights(0.5)
    assert TABLEAUX["dopri5"].dense_weights(1.0) == pytest.approx(list(TABLEAUX["dopri5"].b), abs=1e-15)


@pytest.mark.parametrize("sensitivity", ["checkpointed", "interpolating", "interpolated", "backsolve"])
def test_dopri8_with_every_gradient_method(sensitivity):
    """The dense stages take part in every gradient method (interpolated reads the dense output
    at its nodes, interpolating stores it, checkpointed differentiates it at the inner outputs)."""
    func, y0, t, inputs = _mlp_problem()
    kw = dict(method="dopri8", rtol=1e-10, atol=1e-10)
    loss = lambda s: (pob.odeint(func, y0, t, sensitivity=s, **kw) ** 2).sum()
    g = _flat_grad(loss("backprop"), inputs)
    g_s = _flat_grad(loss(sensitivity), inputs)
    assert rel_err(g_s, g) < (1e-12 if sensitivity == "checkpointed" else 1e-8)


class _ConstantODE(torch.nn.Module):
    """torchdiffeq's gradient-test problem: y' = a + (y - (a t + b))^5, y = a t + b."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.2, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(3.0, dtype=F64))

    def forward(self, t, y):
        return self.a + (y - (self.a * t + self.b)) ** 5


_GRADCHECK = ([(m, "backprop") for m in ("dopri8", "fehlberg2", "heun2", "heun3", *IMPLICIT)]
              + [(m, "backsolve") for m in ("dopri8", "heun3", "radauIIA5", "trbdf2")])


@pytest.mark.parametrize("method,sensitivity", _GRADCHECK)
def test_torchdiffeq_gradcheck_of_y0_and_t(method, sensitivity):
    """The check torchdiffeq's own suite makes of every method (odeint and odeint_adjoint):
    gradcheck in float64 with respect to y0 and the output times, 10 times on [1, 8]."""
    f = _ConstantODE()
    t = torch.linspace(1, 8, 10, dtype=F64, requires_grad=True)
    y0 = (f.a * 1.0 + f.b).detach().reshape(1).requires_grad_(True)
    func = lambda y0, t: pob.odeint(f, y0, t, method=method, sensitivity=sensitivity)
    assert torch.autograd.gradcheck(func, (y0, t))


@pytest.mark.parametrize("method", ["implicit_euler", "implicit_midpoint"])
def test_one_stage_implicit_methods_interpolate_by_cubic_hermite(method):
    """A one-stage collocation polynomial is the chord between the step's ends; cubic Hermite
    is more accurate, so these keep it: free fall (a quadratic, which implicit midpoint steps
    exactly) is exact between grid points, not 0.15 off as the chord was."""
    assert TABLEAUX[method].dense is None
    f = lambda t, y: torch.stack([y[1], torch.full_like(y[1], -9.8)])
    y0 = torch.tensor([10.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)  # 0.5 lies inside the first step
    ys = pob.odeint(f, y0, t, method=method, options={"step_size": 0.37})
    if method == "implicit_midpoint":
        exact = 10.0 - 4.9 * t ** 2
        torch.testing.assert_close(ys[:, 0], exact, rtol=0, atol=1e-12)
