"""The engine: tableaux, convergence orders, tolerances, dense output, agreement with peers."""
import math

import numpy as np
import pytest
import torch
from helpers import SPIRAL_A, cubic_spiral

import pyode_bridge as pob
from pyode_bridge.solvers import TABLEAUX

ADAPTIVE = ["dopri5", "tsit5", "bosh3", "adaptive_heun"]


def _trees(n):
    """Rooted trees with ``n`` nodes, each a sorted tuple of its subtrees (Butcher's trees)."""
    if n == 1:
        return [()]
    out = set()

    def forests(rem, max_size):  # multisets of subtrees with ``rem`` nodes in all
        if rem == 0:
            yield ()
            return
        for size in range(min(rem, max_size), 0, -1):
            for t in _trees(size):
                for rest in forests(rem - size, size):
                    if not rest or _size(rest[0]) < size or rest[0] <= t:
                        yield (t,) + rest
    for forest in forests(n - 1, n - 1):
        out.add(tuple(sorted(forest)))
    return sorted(out)


def _size(t):
    return 1 + sum(_size(s) for s in t)


def _gamma(t):
    g = _size(t)
    for s in t:
        g *= _gamma(s)
    return g


def _stage_matrix(tab):
    """``A`` (with the dense stages appended, their rows spanning the stages before them), ``c``."""
    rows = list(tab.a) + [row for _, row in tab.dense_stages]
    cs = list(tab.c) + [c for c, _ in tab.dense_stages]
    A = np.zeros((len(rows), len(rows)))
    for i, row in enumerate(rows):
        A[i, :len(row)] = row
    return A, np.array(cs)


def _phi(t, A):
    """Elementary weight vector: ``Phi_i(t)``, so that ``b @ Phi(t) = 1 / gamma(t)`` is the order
    condition of tree ``t`` (Hairer, Norsett & Wanner I.2)."""
    v = np.ones(A.shape[0])
    for s in t:
        v = v * (A @ _phi(s, A))
    return v


def _order_residual(weights, A, order, theta=1.0):
    """Largest residual of the order conditions of all trees with ``order`` nodes for ``weights``
    (a continuous extension at ``theta`` must give ``theta**order / gamma``)."""
    return max(abs(weights @ _phi(t, A) - theta**order / _gamma(t)) for t in _trees(order))


def test_tree_counts():
    assert [len(_trees(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]  # OEIS A000081


# The order of each method's continuous extension (cubic Hermite where absent).
# The collocation methods' collocation polynomial: order s (its stages; local error h^(s+1)).
DENSE_ORDER = {"dopri5": 4, "tsit5": 4, "dopri8": 7, "trapezoid": 2, "radauIIA3": 2, "radauIIA5": 3, "gl4": 2, "gl6": 3}


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_tableau_is_consistent(name):
    """Every order condition up to the method's order holds, some of the next order fails (the
    order is exact), the embedded method has its order, row sums are the stage times, the first
    stage is f(t, y), FSAL and the continuous extension are consistent."""
    tab = TABLEAUX[name]
    A, c = _stage_matrix(tab)
    S = tab.stages
    b = np.zeros(A.shape[0])
    b[:S] = tab.b
    for p in range(1, tab.order + 1):
        assert _order_residual(b, A, p) < 1e-12, (name, p)
    assert _order_residual(b, A, tab.order + 1) > 1e-8  # not a higher order than claimed
    np.testing.assert_allclose(A.sum(axis=1), c, atol=1e-12)  # row sums are the stage times
    assert tab.c[0] == 0.0 and tab.a[0] == ()  # the loop supplies stage 0 = f(t, y)
    assert tab.implicit == bool(np.triu(A[:S, :S]).any())
    if tab.adaptive:
        b_hat = b.copy()
        b_hat[:S] -= np.array(tab.b_err)
        for p in range(1, tab.error_order):  # the embedded solution has order error_order - 1
            assert _order_residual(b_hat, A, p) < 1e-12, (name, p)
        assert _order_residual(b_hat, A, tab.error_order) > 1e-8
    if tab.fsal:
        assert tab.a[-1] == tuple(tab.b[:-1]) and tab.c[-1] == 1.0 and tab.b[-1] == 0.0
    if tab.dense is not None:
        assert len(tab.dense) == A.shape[0]
        np.testing.assert_allclose(tab.dense_weights(1.0), b, atol=1e-12)  # continuous at t1
        order = DENSE_ORDER[name]
        for theta in (0.1, 0.37, 0.5, 0.8):
            w = np.array(tab.dense_weights(theta))
            for p in range(1, order + 1):
                assert _order_residual(w, A, p, theta) < 1e-12, (name, theta, p)
        assert max(_order_residual(np.array(tab.dense_weights(th)), A, order + 1, th)
                   for th in (0.37, 0.5)) > 1e-8


def _exp_sin_error(method, h):
    f = lambda t, y: y * torch.cos(t)
    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    ys = pob.odeint(f, y0, t, method=method, options={"step_size": h})
    return abs(ys[-1].item() - math.exp(math.sin(2.0)))


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_convergence_order(method, order):
    hs = [0.1, 0.05, 0.025, 0.0125]
    errs = [_exp_sin_error(method, h) for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errs)


def _solve(method, f, y0, t, tol):
    return pob.odeint(f, y0, t, rtol=tol, atol=tol, method=method)


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("backwards", [False, True])
def test_adaptive_reaches_tolerance_linear(method, backwards):
    t = torch.linspace(0.0, 5.0, 11, dtype=torch.float64)
    if backwards:
        t = t.flip(0)
    # Exponential decay, and the harmonic oscillator y'' = -y.
    y0 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    f = lambda t, y: torch.stack([-y[0], y[2], -y[1]])
    tol = 1e-8 if method != "adaptive_heun" else 1e-6
    ys = _solve(method, f, y0, t, tol)
    s = t - t[0]
    exact = torch.stack([torch.exp(-s), torch.sin(s), torch.cos(s)], dim=1)
    # error relative to the solution's size (backwards, exp(-t) grows to e^5)
    err = ((ys - exact).abs() / (1 + exact.abs())).max().item()
    assert err < 200 * tol, err
    # and it is not absurdly over-resolved either: the error follows the tolerance
    ys_loose = _solve(method, f, y0, t, 1e3 * tol)
    assert ((ys_loose - exact).abs() / (1 + exact.abs())).max().item() > err


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
@pytest.mark.parametrize("backwards", [False, True])
def test_adaptive_nonlinear_spiral_against_scipy(method, backwards):
    from scipy.integrate import solve_ivp

    t = torch.linspace(0.0, 10.0, 21, dtype=torch.float64)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    A = SPIRAL_A.numpy()
    ref = solve_ivp(lambda t, y: A @ y**3, (0.0, 10.0), y0.numpy(), method="DOP853",
                    t_eval=t.numpy(), rtol=1e-13, atol=1e-13).y.T
    if backwards:  # start from the end state and integrate back to the start
        y0 = torch.from_numpy(ref[-1].copy())
        t, ref = t.flip(0), ref[::-1].copy()
    tol = 1e-8
    ys = _solve(method, cubic_spiral, y0, t, tol)
    err = np.abs(ys.numpy() - ref).max()
    # Backwards the spiral expands, so local errors are amplified (3rd-order bosh3 most).
    assert err < (1e4 if backwards else 500) * tol, err


@pytest.mark.parametrize("method,min_order", [("dopri5", 3.7), ("tsit5", 3.7), ("bosh3", 2.7),
                                              ("rk4", 2.7), ("midpoint", 1.7)])
def test_dense_output_between_steps_has_the_solver_order(method, min_order):
    """Outputs strictly inside steps come from the continuous extension; its error decays with
    the interpolant's order (4 for dopri5/tsit5, 3 for cubic Hermite, capped by the method)."""
    f = lambda t, y: y * torch.cos(t)
    y0 = torch.tensor([1.0], dtype=torch.float64)
    errs, hs = [], [0.4, 0.2, 0.1, 0.05]
    for h in hs:
        grid = torch.arange(0.0, 2.0 + 1e-12, h, dtype=torch.float64)
        inner = grid[:-1] + 0.37 * h  # one output strictly inside every step
        t_out = torch.cat([grid[:1], inner, grid[-1:]])
        ys = pob.odeint(f, y0, t_out, method=method, options={"grid": grid})
        exact = torch.exp(torch.sin(t_out))
        errs.append((ys[1:-1, 0] - exact[1:-1]).abs().max().item())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert slope > min_order, (slope, errs)


def test_output_times_do_not_shorten_steps():
    f = lambda t, y: -y + torch.sin(3 * t)
    y0 = torch.ones(3, dtype=torch.float64)
    s1, s2 = pob.SolveStats(), pob.SolveStats()
    few = pob.odeint(f, y0, torch.tensor([0.0, 4.0], dtype=torch.float64), rtol=1e-6, atol=1e-6, stats=s1)
    many = pob.odeint(f, y0, torch.linspace(0.0, 4.0, 200, dtype=torch.float64), rtol=1e-6, atol=1e-6,
                      stats=s2)
    assert s1.steps_forward == s2.steps_forward and s1.nfe_forward == s2.nfe_forward
    torch.testing.assert_close(few[-1], many[-1], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4", "euler"])
def test_matches_torchdiffeq(method):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    f = lambda t, y: net(y)
    y0 = torch.randn(8, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)  # on the fixed-step grid too
    kw = dict(rtol=1e-6, atol=1e-6, method=method)
    if method in ("rk4", "euler"):
        kw["options"] = {"step_size": 0.01}
    ours = pob.odeint(f, y0, t, **kw)
    theirs = torchdiffeq.odeint(f, y0, t, **kw)
    if method in ("rk4", "euler"):  # same grid, same formula: identical up to round-off
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    else:
        exact = torchdiffeq.odeint(f, y0, t, rtol=1e-12, atol=1e-12, method="dopri5")
        err_ours, err_theirs = (ours - exact).abs().max(), (theirs - exact).abs().max()
        assert err_ours < 100 * 1e-6
        assert err_ours <= 3 * err_theirs + 1e-7, (err_ours, err_theirs)


def test_float32_and_tuple_state_and_shapes():
    net = torch.nn.Linear(3, 3)
    y0 = (torch.randn(4, 3), torch.zeros(4, 1))
    f = lambda t, y: (net(y[0]), y[0].sum(dim=1, keepdim=True))
    t = torch.linspace(0, 1, 5)
    z, logp = pob.odeint(f, y0, t, rtol=1e-5, atol=1e-6)
    assert z.shape == (5, 4, 3) and logp.shape == (5, 4, 1) and z.dtype == torch.float32
    z[-1].sum().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()


def test_stats_are_filled_and_time_passed_as_tensor():
    seen = []

    def f(t, y):
        seen.append(t)
        return -y

    s = pob.SolveStats()
    pob.odeint(f, torch.ones(2), torch.tensor([0.0, 1.0]), stats=s)
    assert s.nfe_forward == len(seen) > 0 and s.steps_forward > 0
    assert all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in seen)
    # steps: FSAL dopri5 costs 6 evaluations per attempted step + 2 to start
    assert s.nfe_forward == 6 * (s.steps_forward + s.steps_rejected) + 2


def test_each_part_of_a_tuple_state_is_error_controlled():
    """A small, fast part beside a large, idle one (a CNF's logp beside z) must meet the tolerance
    on its own; one RMS over the concatenated state would average its error away."""
    f = lambda t, y: (torch.zeros_like(y[0]), torch.cos(10 * t).expand_as(y[1]))
    t = torch.tensor([0.0, 3.0], dtype=torch.float64)
    y0 = (torch.ones(10_000, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    tol = 1e-6
    _, w = pob.odeint(f, y0, t, rtol=tol, atol=tol)
    exact = math.sin(30.0) / 10
    err_tuple = abs(w[-1].item() - exact)
    flat = pob.odeint(lambda t, y: torch.cat([torch.zeros(10_000, dtype=y.dtype),
                                              torch.cos(10 * t).reshape(1)]),
                      torch.cat(y0), t, rtol=tol, atol=tol)
    err_flat = abs(flat[-1, -1].item() - exact)
    assert err_tuple < 10 * tol
    assert err_flat > 10 * err_tuple  # what the mixed norm avoids


@pytest.mark.parametrize("backwards", [False, True])
def test_a_step_within_one_percent_of_the_end_or_a_stop_is_stretched_onto_it(backwards):
    # dy/dt = 0 has zero error estimate: every step is accepted, so the step count shows the rule.
    zero = lambda t, y: torch.zeros_like(y)  # noqa: E731
    y0 = torch.ones(3, dtype=torch.float64)
    sign = -1.0 if backwards else 1.0
    t = torch.tensor([0.0, sign])

    def steps(**options):
        st = pob.SolveStats()
        pob.odeint(zero, y0, t, method="dopri5", options=options, stats=st)
        return st.steps_forward

    # 0.995 + 1% reaches 1: one step instead of 0.995 and a sliver of 0.005.
    assert steps(first_step=0.995, max_step=0.995 * 1.01) == 1
    # Stretching never exceeds max_step: then the sliver stays.
    assert steps(first_step=0.995, max_step=0.995) == 2
    # Further than 1% short: not stretched (0.98 -> the step to the end follows).
    assert steps(first_step=0.98, max_step=0.98) == 2
    # The same for a stop inside the interval (step_t): 0.497 lands on 0.5, then 0.5 to the end.
    assert steps(first_step=0.497, max_step=0.503, step_t=torch.tensor([0.5 * sign])) == 2
    assert steps(first_step=0.49, max_step=0.49, step_t=torch.tensor([0.5 * sign])) == 4
