"""No silently wrong gradient: every gradient method against exact or high-accuracy references,
on the cases an outside review found returning wrong or missing gradients without a word.

Each gradient must be right (within the stated bound) or come with a warning/error that says it
may not be.
"""
import cmath
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import rel_err

import pyode_bridge as pob
from pyode_bridge.solvers import PIController

F64 = torch.float64
METHODS = ["backprop", "checkpointed", "backsolve", "interpolating", "interpolated"]
LEAN = ["checkpointed", "backsolve", "interpolating", "interpolated"]


# --- a forced problem with a closed-form gradient ------------------------------------------------

class Forced(torch.nn.Module):
    """``y' = -k y + A sin(w t)``: the parameter integrand ``a(t) sin(w t)`` oscillates while the
    adjoint ``a`` itself is smooth, so an adjoint whose step size follows ``a`` alone under-resolves
    dL/dA (the review's repro: wrong sign at tol 1e-6)."""

    def __init__(self, k, amp, w):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=F64))
        self.amp = torch.nn.Parameter(torch.tensor(amp, dtype=F64))
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=F64))

    def forward(self, t, y):
        return -self.k * y + self.amp * torch.sin(self.w * t)


def forced_exact_grad(k, amp, w, T=10.0):
    """dy(T)/d(k, A, w) for y(0) = 0, by complex-step differentiation of the closed form."""
    def y_T(k, amp, w):
        return amp * (k * cmath.sin(w * T) - w * cmath.cos(w * T) + w * cmath.exp(-k * T)) / (k * k + w * w)

    h = 1e-30
    return torch.tensor([y_T(k + 1j * h, amp, w).imag / h, y_T(k, amp + 1j * h, w).imag / h,
                         y_T(k, amp, w + 1j * h).imag / h], dtype=F64)


def forced_grad(sens, k, w, n_out, tol, adjoint_options=None):
    func = Forced(k, 1.0, w)
    t = torch.linspace(0.0, 10.0, n_out, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = pob.odeint(func, torch.zeros(1, dtype=F64), t, rtol=tol, atol=tol, sensitivity=sens,
                        adjoint_options=adjoint_options)
        ys[-1].sum().backward()
    g = torch.stack([func.k.grad, func.amp.grad, func.w.grad])
    return g, [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("k,w", [(0.5, 20.0), (2.0, 5.0), (0.1, 10.0)])
@pytest.mark.parametrize("n_out", [2, 11])
@pytest.mark.parametrize("sens", METHODS)
def test_forced_problem_gradient_within_1e_4(sens, k, w, n_out):
    g, _ = forced_grad(sens, k, w, n_out, 1e-6)
    assert rel_err(g, forced_exact_grad(k, 1.0, w)) < 1e-4


@pytest.mark.parametrize("sens", METHODS)
def test_forced_problem_gradient_converges_or_warns(sens):
    """As tol -> 1e-10 every method converges (measured 1e-10 .. 1e-9); ``interpolated`` with one
    output interval stalls at 1.5e-6 on the fast forcing - and says so (its guard)."""
    exact = forced_exact_grad(0.5, 1.0, 20.0)
    g, warned = forced_grad(sens, 0.5, 20.0, 2, 1e-10)
    err = rel_err(g, exact)
    if warned:
        assert sens == "interpolated" and "interpolant" in str(warned[0].message)
        assert err < 1e-4
    else:
        assert err < 1e-8


def test_seminorm_is_cheaper_but_can_be_wrong_on_the_forced_problem():
    """adjoint_options={"norm": "seminorm"} leaves the parameter integral out of the error norm:
    fewer backward steps, and on this problem the wrong sign of dL/dA (documented risk)."""
    exact = forced_exact_grad(0.5, 1.0, 20.0)
    stats = {}
    for opts in (None, {"norm": "seminorm"}):
        func = Forced(0.5, 1.0, 20.0)
        s = pob.SolveStats()
        ys = pob.odeint(func, torch.zeros(1, dtype=F64), torch.tensor([0.0, 10.0], dtype=F64), rtol=1e-6,
                        atol=1e-6, sensitivity="interpolating", adjoint_options=opts, stats=s)
        ys[-1].sum().backward()
        stats[opts is None] = (s.nfe_backward, torch.stack([func.k.grad, func.amp.grad, func.w.grad]))
    (nfe_full, g_full), (nfe_semi, g_semi) = stats[True], stats[False]
    assert rel_err(g_full, exact) < 1e-5
    assert nfe_semi < nfe_full / 4
    assert g_semi[1] * exact[1] < 0  # dL/dA: wrong sign under the seminorm


@pytest.mark.parametrize("sens", LEAN)
def test_adjoint_accuracy_does_not_depend_on_the_loss_scale(sens):
    """The adjoint's atol is in units of the incoming gradient: a loss scaled by 1e-9 gets the
    same relative accuracy (with a fixed atol its gradient would be solver noise)."""
    lam = 10.0
    A = -lam * torch.eye(2, dtype=F64) + torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    errs = []
    for scale in (1.0, 1e-9):
        grads = {}
        for s in ("checkpointed", sens):
            W = A.clone().requires_grad_(True)
            y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
            ys = pob.odeint(lambda t, y: W @ y, y0, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-8,
                            atol=1e-8, sensitivity=s, adjoint_params=(W,))
            (scale * ys[-1].pow(2).sum()).backward()
            grads[s] = torch.cat([y0.grad, W.grad.reshape(-1)])
        errs.append(rel_err(grads[sens], grads["checkpointed"]))
    assert errs[1] < 1e-4 and errs[1] < 10 * errs[0] + 1e-12


@pytest.mark.parametrize("k,w", [(0.5, 20.0), (2.0, 5.0), (0.1, 10.0)])
def test_interpolated_guard_is_quiet_where_the_gradient_is_right(k, w):
    """With ten output intervals at 1e-10 the interpolant misses dopri5's dense output by 16-21
    tolerances (14 with Hairer's error estimate), about what the dense output itself is off the
    solution, while the gradient is as accurate as checkpointed's: the guard (100 tolerances)
    stays quiet. With one interval the (0.5, 20) case misses by 9e8 and warns (above)."""
    g, warned = forced_grad("interpolated", k, w, 11, 1e-10)
    ref, _ = forced_grad("checkpointed", k, w, 11, 1e-10)
    exact = forced_exact_grad(k, 1.0, w)
    assert not warned, warned[0].message
    assert rel_err(g, exact) < max(3 * rel_err(ref, exact), 1e-9)


# --- gradients with respect to t -----------------------------------------------------------------

@pytest.mark.parametrize("sens", METHODS)
def test_t_grad_of_exponential_decay(sens):
    t = torch.tensor([0.0, 2.0], dtype=F64, requires_grad=True)
    ys = pob.odeint(lambda t, y: -0.5 * y, torch.ones(1, dtype=F64), t, rtol=1e-10, atol=1e-10,
                    sensitivity=sens)
    ys[-1].sum().backward()
    e = 0.5 * math.exp(-1.0)
    torch.testing.assert_close(t.grad, torch.tensor([e, -e], dtype=F64), rtol=1e-8, atol=1e-10)


def _tdep(t, y):
    return torch.sin(t) * y - 0.3 * y ** 3 + torch.cos(2 * t)


@pytest.mark.parametrize("sens", METHODS)
@pytest.mark.parametrize("times", [[0.0, 0.5, 1.3], [1.3, 0.4, -0.2]], ids=["increasing", "decreasing"])
def test_gradcheck_y0_and_t(sens, times):
    y0 = torch.tensor([0.7, 1.2], dtype=F64, requires_grad=True)
    t = torch.tensor(times, dtype=F64, requires_grad=True)

    def fn(y0, t):
        return pob.odeint(_tdep, y0, t, sensitivity=sens, rtol=1e-12, atol=1e-12)

    assert torch.autograd.gradcheck(fn, (y0, t), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sens", METHODS)
def test_only_t_requires_grad(sens):
    """The output is attached to the graph when t is the only input that requires grad."""
    t = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    ys = pob.odeint(_tdep, torch.tensor([0.7], dtype=F64), t, sensitivity=sens, rtol=1e-10, atol=1e-10)
    assert ys.requires_grad
    ys[-1].sum().backward()
    y1 = ys[-1].detach()
    torch.testing.assert_close(t.grad[1], _tdep(t[1].detach(), y1).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sens", METHODS)
def test_learnable_end_time_trains(sens):
    """FFJORD's train_T: an nn.Parameter end time stacked into t. y' = -y from 1 must reach
    exp(-2) at T = 2: gradient descent on T finds it."""
    T = torch.nn.Parameter(torch.tensor(1.5, dtype=F64))
    opt = torch.optim.SGD([T], lr=10.0)
    for _ in range(40):
        opt.zero_grad()
        t = torch.stack([torch.zeros((), dtype=F64), T])
        ys = pob.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), t, sensitivity=sens, rtol=1e-9, atol=1e-9)
        ((ys[-1] - math.exp(-2.0)) ** 2).sum().backward()
        opt.step()
    assert abs(T.item() - 2.0) < 1e-4


# --- the time dtype --------------------------------------------------------------------------------

def test_float64_state_with_float32_t_keeps_float64_accuracy():
    """func sees t in the state's dtype and stage times are float64: y' = cos t on [0, 100] at
    tol 1e-10 (review: float32 stage times gave error 4e-7 with 306,500 NFE)."""
    stats = {}
    for t_dtype in (torch.float32, torch.float64):
        s = pob.SolveStats()
        ys = pob.odeint(lambda t, y: torch.cos(t).expand_as(y), torch.zeros(1, dtype=F64),
                        torch.linspace(0, 100, 2, dtype=t_dtype), rtol=1e-10, atol=1e-10, stats=s)
        stats[t_dtype] = (abs(ys[-1].item() - math.sin(100.0)), s.nfe_forward)
    assert stats[torch.float32][0] < 1e-9
    assert stats[torch.float32][1] == stats[torch.float64][1]


@pytest.mark.parametrize("state_dtype,t_dtype", [(torch.float32, F64), (F64, torch.float32)])
def test_func_sees_t_in_the_state_dtype(state_dtype, t_dtype):
    seen = set()

    def f(t, y):
        seen.add(t.dtype)
        return -torch.cat([y[:1], t.reshape(1)])  # breaks if the dtypes differ

    pob.odeint(f, torch.ones(2, dtype=state_dtype), torch.tensor([0.0, 1.0], dtype=t_dtype))
    assert seen == {state_dtype}


# --- parameters, re-use of the graph ----------------------------------------------------------------

def _mlp_func(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


@pytest.mark.parametrize("sens", LEAN)
def test_duplicate_adjoint_params_counted_once(sens):
    """Tied weights passed as two parameter lists: each tensor gets its gradient once."""
    net = _mlp_func()
    y0 = torch.tensor([[0.3, -0.2]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    grads = {}
    for s, params in (("backprop", None), (sens, list(net.parameters()) * 2)):
        net.zero_grad()
        ys = pob.odeint(lambda t, y: net(y), y0, t, sensitivity=s, rtol=1e-10, atol=1e-10, adjoint_params=params)
        ys[-1].sum().backward()
        grads[s] = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert rel_err(grads[sens], grads["backprop"]) < 1e-6


@pytest.mark.parametrize("sens", METHODS)
def test_second_backward_with_retain_graph_gives_the_same_gradient(sens):
    net = _mlp_func()
    y0 = torch.tensor([[0.3, -0.2]], dtype=F64, requires_grad=True)
    ys = pob.odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), sensitivity=sens,
                    rtol=1e-9, atol=1e-9)
    loss = ys.pow(2).sum()
    g1 = torch.autograd.grad(loss, [y0] + list(net.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, [y0] + list(net.parameters()))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sens", METHODS)
def test_jacobian_through_the_solve(sens):
    """torch.autograd.functional.jacobian runs one backward per output entry on one graph."""
    net = _mlp_func()
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def fn(y0, s=sens):
        return pob.odeint(lambda t, y: net(y), y0, t, sensitivity=s, rtol=1e-10, atol=1e-10)[-1]

    y0 = torch.tensor([0.3, -0.2], dtype=F64)
    J = torch.autograd.functional.jacobian(fn, y0)
    J_ref = torch.autograd.functional.jacobian(lambda y: fn(y, "backprop"), y0)
    assert rel_err(J, J_ref) < 1e-6


@pytest.mark.parametrize("sens", LEAN)
def test_double_backward_raises_naming_backprop(sens):
    net = _mlp_func()
    y0 = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    ys = pob.odeint(lambda t, y: net(y), y0, torch.tensor([0.0, 1.0], dtype=F64), sensitivity=sens)
    (g,) = torch.autograd.grad(ys[-1].pow(2).sum(), y0, create_graph=True)
    with pytest.raises(RuntimeError, match="sensitivity='backprop'"):
        g.sum().backward()


def test_double_backward_through_backprop_is_exact():
    net = _mlp_func()
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda y: pob.odeint(lambda t, y: net(y), y, t, rtol=1e-10,
                                                             atol=1e-10), (y0,))


@pytest.mark.parametrize("sens", METHODS)
def test_single_time_is_y0_with_identity_gradient(sens):
    y0 = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    ys = pob.odeint(lambda t, y: -y, y0, torch.tensor([0.5], dtype=F64), sensitivity=sens)
    assert ys.shape == (1, 2) and torch.equal(ys[0].detach(), y0.detach())
    (ys[0] * torch.tensor([2.0, 3.0], dtype=F64)).sum().backward()
    assert torch.equal(y0.grad, torch.tensor([2.0, 3.0], dtype=F64))


def test_captured_non_leaf_tensor_gets_its_gradient_without_a_warning():
    p = torch.tensor([0.4, 1.5], dtype=F64, requires_grad=True)
    for sens in METHODS:
        W = 2 * p  # a non-leaf: its gradient reaches p through autograd, outside the solve
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ys = pob.odeint(lambda t, y: -W * y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                            sensitivity=sens, rtol=1e-10, atol=1e-10)
            ys[-1].sum().backward()
        # d/dp exp(-2 p) = -2 exp(-2 p)
        torch.testing.assert_close(p.grad, -2 * torch.exp(-2 * p.detach()), rtol=1e-7, atol=1e-9)
        p.grad = None


def _listed_derived_tensors_grads(sens, listed):
    """p and q leaves; w = sin(p) q and v = exp(w) computed from them outside func, which uses all
    four: gradients of sum(y(T)^2) w.r.t. (p, q) with ``listed`` as adjoint_params."""
    p = torch.tensor([0.7, 0.3], dtype=F64, requires_grad=True)
    q = torch.tensor(0.5, dtype=F64, requires_grad=True)
    w = torch.sin(p) * q
    v = w.exp()
    kwargs = {} if listed is None else {"adjoint_params": listed(p, q, w, v)}
    ys = pob.odeint(lambda t, y: -w * y + v * p.sum() * torch.cos(y) + 0.1 * q * y ** 2,
                    torch.ones(2, dtype=F64), torch.tensor([0.0, 1.5], dtype=F64), rtol=1e-11,
                    atol=1e-11, sensitivity=sens, **kwargs)
    (ys[-1] ** 2).sum().backward()
    return torch.cat([p.grad, q.grad.reshape(1)])


@pytest.mark.parametrize("sens", LEAN)
@pytest.mark.parametrize("listed", [lambda p, q, w, v: (w, p, q), lambda p, q, w, v: (v, w, q, p),
                                    lambda p, q, w, v: (v, q, p)], ids=["w_p_q", "chain_v_w", "v_q_p"])
def test_listed_tensor_and_the_tensors_it_came_from_get_the_total_derivative(sens, listed):
    # adjoint_params holding w = f(p) beside p: each backward call re-walks w's graph (no "backward
    # through the graph a second time"), and p's share through w is counted once (torchdiffeq counts
    # it twice). The reference is backprop through the solver, the true total derivative.
    ref = _listed_derived_tensors_grads("backprop", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _listed_derived_tensors_grads(sens, listed)
    assert rel_err(g, ref) < 1e-8


@pytest.mark.parametrize("sens", LEAN)
def test_graph_above_a_listed_tensor_is_walked_once(sens):
    # torchcde's stacked CDEs: a listed tensor computed from an earlier solve's output; the backward
    # must reach that earlier graph once (autograd's own pass), not from every func derivative.
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            if getattr(ctx, "done", False):
                raise RuntimeError("the graph above the listed tensor was walked twice")
            ctx.done = True
            return g

    x = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)
    grads = {}
    for s in ("backprop", sens):
        coeffs = Once.apply(x) * 2.0
        head, tail = coeffs[:2], coeffs[2]  # func reads views of the listed tensor
        ys = pob.odeint(lambda t, y: -tail * y + head, torch.ones(2, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                        sensitivity=s, rtol=1e-10, atol=1e-10,
                        **({} if s == "backprop" else {"adjoint_params": (coeffs,)}))
        (grads[s],) = torch.autograd.grad(ys[-1].sum(), x)
    assert rel_err(grads[sens], grads["backprop"]) < 1e-8


@pytest.mark.parametrize("sens", LEAN)
def test_listed_tensor_that_does_not_require_grad_is_skipped(sens):
    # adjoint_params=(w, p) with w = 2 p.detach() (a constant) beside p: w has no gradient to get, and
    # p's must still be backprop's (the backward asked autograd for df/dw and failed inside it).
    grads = {}
    for s in ("backprop", sens):
        p = torch.tensor([0.7, -0.4], dtype=F64, requires_grad=True)
        w = 2 * p.detach()
        ys = pob.odeint(lambda t, y: -w * y - 0.3 * p * torch.sin(y), torch.ones(2, dtype=F64),
                        torch.tensor([0.0, 1.0], dtype=F64), sensitivity=s, rtol=1e-10, atol=1e-10,
                        **({} if s == "backprop" else {"adjoint_params": (w, p)}))
        (grads[s],) = torch.autograd.grad((ys[-1] ** 2).sum(), p)
    assert rel_err(grads[sens], grads["backprop"]) < 1e-8


def test_torchdiffeq_adjoint_with_a_derived_tensor_and_its_leaf_gives_the_true_gradient():
    # The repro: w = 2 p, f = -w y, adjoint_params=(w, p); dL/dp = -2 T sum(y(T)).
    import pyode_bridge.torchdiffeq as tdc

    p = torch.tensor(0.7, dtype=F64, requires_grad=True)
    w = 2 * p
    ys = tdc.odeint_adjoint(lambda t, y: -w * y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                            adjoint_params=(w, p), rtol=1e-10, atol=1e-10)
    ys[-1].sum().backward()
    exact = -2 * 2 * torch.exp(-2 * p.detach())
    assert abs(float(p.grad - exact)) < 1e-8 * abs(float(exact))
    # and a second backward through the same retained graph gives the same again
    w = 2 * p
    ys = tdc.odeint_adjoint(lambda t, y: -w * y, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                            adjoint_params=(w, p), rtol=1e-10, atol=1e-10)
    p.grad = None
    ys[-1].sum().backward(retain_graph=True)
    ys[-1].sum().backward()
    assert abs(float(p.grad - 2 * exact)) < 2e-8 * abs(float(exact))


@pytest.mark.parametrize("sens", LEAN)
def test_unlisted_tensor_warns_for_every_lean_method(sens):
    c = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)
    net = _mlp_func()
    with pytest.warns(RuntimeWarning, match="not in adjoint_params"):
        ys = pob.odeint(lambda t, y: net(y) * c, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                        sensitivity=sens, adjoint_params=tuple(net.parameters()))
        ys[-1].sum().backward()


class _MakesItsOwnLeaf(torch.nn.Module):
    """FFJORD's odefunc: t turned into a fresh leaf requiring grad inside forward, on every call."""

    def __init__(self, captured=None):
        super().__init__()
        self.net = _mlp_func()
        self.captured = captured

    def forward(self, t, y):
        tt = torch.ones_like(y[..., :1]) * t.clone().detach().requires_grad_(True).type_as(y)
        out = self.net(y) + 0.1 * tt
        return out if self.captured is None else out * self.captured


@pytest.mark.parametrize("sens", LEAN)
def test_a_leaf_func_makes_itself_is_not_reported_but_a_captured_one_still_is(sens):
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    func = _MakesItsOwnLeaf()
    ref = torch.autograd.grad(pob.odeint(func, y0, t, rtol=1e-10, atol=1e-10)[-1].sum(),
                              [y0] + list(func.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = pob.odeint(func, y0, t, sensitivity=sens, rtol=1e-10, atol=1e-10)
        g = torch.autograd.grad(ys[-1].sum(), [y0] + list(func.parameters()))
    assert rel_err(torch.cat([x.reshape(-1) for x in g]), torch.cat([x.reshape(-1) for x in ref])) < 1e-6
    c = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)  # captured, not a parameter
    func = _MakesItsOwnLeaf(captured=c)
    with pytest.warns(RuntimeWarning, match=r"uses 1 tensor\(s\) .* \(shapes \(2,\)\)"):
        ys = pob.odeint(func, y0, t, sensitivity=sens, adjoint_params=tuple(func.parameters()))
        ys[-1].sum().backward()



@pytest.mark.parametrize("method", ["adaptive_heun", "fehlberg2"])
def test_checkpointed_segments_that_start_from_a_carried_stage_check_func_the_same_way(method):
    """With a carried first stage (ButcherTableau.carry_last) the last segment's first step makes
    no evaluation of its own: the check runs on the step's last stage, through the same filter of
    the leaves func makes itself, and still names a captured tensor."""
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    sens = pob.Checkpointed(every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pob.odeint(_MakesItsOwnLeaf(), y0, t, method=method, sensitivity=sens)[-1].sum().backward()
    func = _MakesItsOwnLeaf(captured=torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True))
    with pytest.warns(RuntimeWarning, match=r"uses 1 tensor\(s\) .* \(shapes \(2,\)\)"):
        ys = pob.odeint(func, y0, t, method=method, sensitivity=sens, adjoint_params=tuple(func.parameters()))
        ys[-1].sum().backward()

_UNSEEN_LEAVES = {  # ways of making a leaf that pass no torch function
    "parameter": lambda y: torch.nn.Parameter(torch.zeros((), dtype=y.dtype)),
    "from_numpy": lambda y: torch.from_numpy(np.zeros(1)).requires_grad_(True),
    "legacy_ctor": lambda y: torch.Tensor([0.0]).requires_grad_(True),
}


@pytest.mark.parametrize("sens", LEAN)
@pytest.mark.parametrize("make", list(_UNSEEN_LEAVES), ids=list(_UNSEEN_LEAVES))
def test_a_leaf_func_makes_by_a_path_torch_functions_miss_is_not_reported(sens, make):
    k = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def func(t, y):
        zero = _UNSEEN_LEAVES[make](y)
        return -k * y + 0.0 * zero.sum().to(y.dtype)

    t = torch.tensor([0.0, 1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = pob.odeint(func, torch.ones(2, dtype=F64), t, sensitivity=sens, adjoint_params=(k,),
                        rtol=1e-10, atol=1e-10)
        (g,) = torch.autograd.grad(ys[-1].sum(), k)
    assert abs(float(g) + 2 * math.exp(-0.5)) < 1e-8  # d/dk of 2 exp(-k)
    c = torch.tensor([0.5, 2.0], dtype=F64, requires_grad=True)  # captured, not listed: still named
    with pytest.warns(RuntimeWarning, match=r"uses 1 tensor\(s\) .* \(shapes \(2,\)\)"):
        ys = pob.odeint(lambda t, y: func(t, y) * c, torch.ones(2, dtype=F64), t, sensitivity=sens,
                        adjoint_params=(k,))
        ys[-1].sum().backward()


# --- interpolated must not be O(1) wrong quietly -----------------------------------------------------

class Cubic(torch.nn.Module):
    """torchdiffeq's own adjoint test problem: y' = y^3 A on [0, 25]."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64))

    def forward(self, t, y):
        return torch.mm(y ** 3, self.A)


def _cubic_grad(sens):
    func = Cubic()
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64, requires_grad=True)
    ys = pob.odeint(func, y0, torch.linspace(0, 25, 2, dtype=F64), rtol=1e-6, atol=1e-6, sensitivity=sens)
    ys[-1].pow(2).sum().backward()
    return torch.cat([y0.grad.reshape(-1), func.A.grad.reshape(-1)])


def test_interpolated_guard_names_the_interval_error_and_fix():
    ref = _cubic_grad("checkpointed")
    with pytest.warns(RuntimeWarning, match=r"\[0, 25\] with 16 nodes misses .*'checkpointed'"):
        g = _cubic_grad(pob.Interpolated(nodes=16))
    assert rel_err(g, ref) > 0.05  # the review's 7%: really wrong, hence the warning
    with pytest.raises(pob.SolverError, match="interpolant"):
        _cubic_grad(pob.Interpolated(nodes=16, on_inaccuracy="raise"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _cubic_grad(pob.Interpolated(nodes=16, on_inaccuracy="ignore"))


def test_interpolated_auto_is_quiet_and_accurate_where_it_can_be():
    """Where the trajectory is smooth enough, "auto" (the default) picks a small grid, stays
    quiet and matches checkpointed."""
    func = _mlp_func()
    y0 = torch.tensor([[0.3, -0.2]], dtype=F64, requires_grad=True)
    stats = pob.SolveStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = pob.odeint(lambda t, y: func(y), y0, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-7, atol=1e-7,
                        sensitivity="interpolated", stats=stats)
        ys[-1].sum().backward()
    assert stats.interpolation_nodes[0] <= 16 and stats.interpolation_error <= 1.0


# --- interpolating: its dense output is measured, the gradient is right or it says so -------------

def _robertson(t, y):
    return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2])


def _robertson_grad(method, sens, stats=None):
    """Issue 16's case: Robertson's kinetics at step 0.05, loss on y(1) and y(10), y2 scaled 1e4."""
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    ys = pob.odeint(_robertson, y0, torch.tensor([0.0, 1.0, 10.0], dtype=F64), method=method,
                    options={"step_size": 0.05}, sensitivity=sens, stats=stats)
    return torch.autograd.grad((ys[1:] * torch.tensor([1.0, 1e4, 1.0], dtype=F64)).sum(), y0)[0]


def test_interpolating_guard_warns_where_the_dense_output_misses_a_stiff_transient():
    """trbdf2's cubic Hermite over the first step, which holds the whole transient of y2 (up to
    3.6e-5 within 1e-3): dL/dy0 14% off the discrete gradient, and the guard says so."""
    ref = _robertson_grad("trbdf2", "backprop")
    stats = pob.SolveStats()
    with pytest.warns(RuntimeWarning, match=r"\(interpolating\).*t=0 to t=0.05.*step_size.*'checkpointed'"):
        g = _robertson_grad("trbdf2", "interpolating", stats)
    assert rel_err(g, ref) > 0.01
    assert stats.dense_output_error > pob.Interpolating().guard_rtol
    with pytest.raises(pob.SolverError, match="dense output"):
        _robertson_grad("trbdf2", pob.Interpolating(on_inaccuracy="raise"))
    ckpt = pob.SolveStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _robertson_grad("trbdf2", pob.Interpolating(checkpointing=True, on_inaccuracy="ignore"), ckpt)
    assert ckpt.dense_output_error == stats.dense_output_error  # the same steps, measured alike


@pytest.mark.parametrize("make", [lambda: pob.Interpolating(on_inaccuracy="loud"),
                                  lambda: pob.Interpolated(on_inaccuracy="loud")])
def test_guard_policy_is_validated(make):
    with pytest.raises(ValueError, match=r"on_inaccuracy must be one of \('warn', 'raise', 'ignore'\)"):
        make()


def _lotka(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def _fast_slow(t, y):
    """y0 follows sin(y1) at rate 1000; from y0 = sin(1) on that manifold: stiff, no transient."""
    return torch.stack([-1000.0 * (y[0] - torch.sin(y[1])), 0.5 * y[0] - 0.1 * y[1] + torch.cos(t)])


QUIET = [(_lotka, [3.0, 1.0], "dopri5", {}, 1e-6), (_lotka, [3.0, 1.0], "tsit5", {}, 1e-5),
         (_lotka, [3.0, 1.0], "dopri8", {}, 1e-4), (_lotka, [3.0, 1.0], "rk4", {"step_size": 0.05}, None),
         (_lotka, [3.0, 1.0], "gl4", {"step_size": 0.05}, None),
         (_lotka, [3.0, 1.0], "radauIIA5", {"step_size": 0.1}, None),
         (_fast_slow, [math.sin(1.0), 1.0], "radauIIA5", {"step_size": 0.1}, None)]


@pytest.mark.parametrize("func,y0,method,options,tol", QUIET,
                         ids=[f"{c[0].__name__}-{c[2]}" for c in QUIET])
def test_interpolating_guard_is_quiet_where_the_gradient_is_right(func, y0, method, options, tol):
    """Resolved problems (the last stiff, on its slow manifold): within 0.1% of the converged
    gradient, and no warning."""
    t = torch.tensor([0.0, 2.0, 4.0], dtype=F64)

    def grad(sens, method, options, rtol, atol, stats=None):
        y = torch.tensor(y0, dtype=F64, requires_grad=True)
        ys = pob.odeint(func, y, t, method=method, options=options, rtol=rtol, atol=atol,
                        sensitivity=sens, stats=stats)
        return torch.autograd.grad(ys[1:].sum(), y)[0]

    # Converged references: dopri8 at 1e-10 for the non-stiff problem, radauIIA5's discrete
    # gradient at step 0.02 for the stiff one (1e-9 from radauIIA5 at 0.0005).
    ref = (grad("backprop", "radauIIA5", {"step_size": 0.02}, 1e-12, 1e-12) if func is _fast_slow
           else grad("backprop", "dopri8", {}, 1e-10, 1e-12))
    stats = pob.SolveStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = grad("interpolating", method, options, tol or 1e-7, (tol or 1e-7) * 1e-2, stats)
    assert rel_err(g, ref) < 1e-3
    assert stats.dense_output_error <= pob.Interpolating().guard_rtol


# --- step control ---------------------------------------------------------------------------------------

def test_relative_underflow_floor_solves_tiny_time_scales():
    """The same problem scaled into [0, 1e-14] solves as on [0, 1] (the floor was absolute: any
    rejected step below 16 ulp(1) = 3.6e-15 raised "step size underflow")."""
    nfe = []
    for scale in (1.0, 1e-14):
        s = pob.SolveStats()
        ys = pob.odeint(lambda t, y: -y / scale, torch.ones(1, dtype=F64), torch.tensor([0.0, scale], dtype=F64),
                        rtol=1e-8, atol=1e-10, stats=s)
        assert abs(ys[-1].item() - math.exp(-1.0)) < 1e-7
        nfe.append(s.nfe_forward)
    assert nfe[1] <= 1.5 * nfe[0]


def test_no_step_growth_right_after_a_rejection():
    c = PIController(5)
    h = c.propose(0.1, 0.5, accepted=True)  # accepted: may grow
    assert h > 0.1
    h_rej = c.propose(h, 4.0, accepted=False)
    assert h_rej < h
    assert c.propose(h_rej, 1e-6, accepted=True) == h_rej  # tiny error, but it just failed
    assert c.propose(h_rej, 1e-6, accepted=True) > h_rej  # the next one may grow again


# --- the julia backend's Python side attaches t gradients too -------------------------------------------

def test_julia_path_of_the_front_door_attaches_t_gradients(monkeypatch):
    """The julia solve is replaced by the torch backend's (Julia cannot run here): this checks only
    that the front door wires dL/dt around the julia path as around the torch one."""
    import pyode_bridge.backends.julia as jb

    def fake_julia(func, y0, t, **kw):
        return pob.odeint(func, y0, t.detach(), rtol=1e-10, atol=1e-10)

    monkeypatch.setattr(jb, "odeint_julia", fake_julia)
    t = torch.tensor([0.0, 2.0], dtype=F64, requires_grad=True)
    ys = pob.odeint(lambda t, y: -0.5 * y, torch.ones(1, dtype=F64), t, backend="julia")
    ys[-1].sum().backward()
    e = 0.5 * math.exp(-1.0)
    torch.testing.assert_close(t.grad, torch.tensor([e, -e], dtype=F64), rtol=1e-8, atol=1e-10)
