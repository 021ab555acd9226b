"""pyode_bridge.torchdiffeq: torchdiffeq's API, defaults and results, on pyode-bridge's engine.

Compared against the installed torchdiffeq (0.2.5) where it has the same API."""
import inspect
import math
import warnings

import pytest
import torch

import pyode_bridge as pob
import pyode_bridge.torchdiffeq as tdc

torchdiffeq = pytest.importorskip("torchdiffeq")


def _spiral(t, y):
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=y.dtype)
    return y @ A.T


# ------------------------------------------------------------------------------- API and signatures

@pytest.mark.parametrize("name", ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense"])
def test_signatures_match_torchdiffeq(name):
    ours, theirs = inspect.signature(getattr(tdc, name)), inspect.signature(getattr(torchdiffeq, name))
    assert list(ours.parameters) == list(theirs.parameters)
    for p, q in zip(ours.parameters.values(), theirs.parameters.values()):
        assert p.kind == q.kind, p.name
        if p.name == "odeint_interface":
            assert p.default is tdc.odeint and q.default is torchdiffeq.odeint
        else:
            assert p.default == q.default or (p.default is q.default), p.name


def test_public_names():
    assert set(tdc.__all__) == {"odeint", "odeint_adjoint", "odeint_event", "odeint_dense"}
    assert set(tdc.__all__) <= set(dir(torchdiffeq))


# ------------------------------------------------------------------------------ results agree with it

@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_adaptive_results_agree(method):
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 5.0, 7, dtype=torch.float64)
    ours = tdc.odeint(_spiral, y0, t, rtol=1e-9, atol=1e-10, method=method)
    theirs = torchdiffeq.odeint(_spiral, y0, t, rtol=1e-9, atol=1e-10, method=method)
    exact = torch.stack([torch.linalg.matrix_exp(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]],
                                                              dtype=torch.float64) * s) @ y0 for s in t])
    # Step-size controllers differ (PI here, I there): the same accuracy class, not the same steps.
    assert (ours - exact).abs().max() < 1e-6
    assert (ours - theirs).abs().max() < 2e-6


@pytest.mark.filterwarnings("ignore:.*(corrector|Functional iteration) did not converge")
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "implicit_adams"])
def test_fixed_grid_results_match_to_round_off(method):
    # Same schemes (rk4 is Kutta's 3/8 rule in both), the same grid from step_size and, between grid
    # points, the same default: linear interpolation.
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.6, 1.3, 2.0], dtype=torch.float64)  # mostly between grid points
    ours = tdc.odeint(_spiral, y0, t, method=method, options={"step_size": 0.25})
    theirs = torchdiffeq.odeint(_spiral, y0, t, method=method, options={"step_size": 0.25})
    assert (ours - theirs).abs().max() < 1e-12


@pytest.mark.parametrize("h", [0.125, 0.0625, 0.03125])
def test_explicit_adams_stays_stable_where_torchdiffeqs_is_not(h):
    # torchdiffeq's Adams-Bashforth 11 amplifies round-off on this spiral at every one of these
    # steps (70, 1.3e5, 1.8e10 off); ours lowers the order where its top term grows, and converges
    # at order 4 (3.4e-3, 1.5e-4, 9.9e-6).
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)
    exact = pob.odeint(_spiral, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
    ours = tdc.odeint(_spiral, y0, t, method="explicit_adams", options={"step_size": h})
    theirs = torchdiffeq.odeint(_spiral, y0, t, method="explicit_adams", options={"step_size": h})
    err, their_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert err < 20 * h ** 4 and err < their_err / 100, (err, their_err)


def test_tuple_state_and_decreasing_time_agree():
    f = lambda t, y: (-y[0] * t, y[0].sum() - 0.5 * y[1])
    y0 = (torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    t = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    ours = tdc.odeint(f, y0, t, rtol=1e-10, atol=1e-10)
    theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-10, atol=1e-10)
    assert isinstance(ours, tuple) and [o.shape for o in ours] == [s.shape for s in theirs]
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-8


def test_adjoint_gradients_agree():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    func = F()
    y0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    grads = []
    for lib in (tdc, torchdiffeq):
        ys = lib.odeint_adjoint(func, y0, t, rtol=1e-9, atol=1e-10)
        grads.append(torch.autograd.grad(ys.pow(2).sum(), (y0, *func.parameters())))
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-6


# ------------------------------------------------------------------------------------------- defaults

def test_no_max_num_steps_cap():
    # 10001 Euler steps: over pyode_bridge.odeint's default cap, none in torchdiffeq.
    f, y0 = (lambda t, y: -y), torch.ones(1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0001], dtype=torch.float64)
    ys = tdc.odeint(f, y0, t, method="euler", options={"step_size": 1e-4})
    assert abs(ys[-1].item() - (1 - 1e-4) ** 10001) < 1e-9
    with pytest.raises(pob.SolverError, match="max_num_steps"):
        pob.odeint(f, y0, t, method="euler", options={"step_size": 1e-4})


def test_fixed_grid_interpolates_linearly_by_default():
    y0 = torch.ones(1, dtype=torch.float64)
    f = lambda t, y: torch.cos(t) * y
    grid = tdc.odeint(f, y0, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), method="rk4",
                      options={"step_size": 0.5})
    mid = tdc.odeint(f, y0, torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), method="rk4",
                     options={"step_size": 0.5})
    assert torch.allclose(mid[1], 0.5 * (grid[0] + grid[1]), rtol=0, atol=1e-15)
    # pyode_bridge.odeint's own default there is the cubic Hermite extension (closer).
    ours = pob.odeint(f, y0, torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), method="rk4",
                      options={"step_size": 0.5})
    exact = math.exp(math.sin(0.25))
    assert abs(ours[1].item() - exact) < abs(mid[1].item() - exact) / 10


def test_unexpected_options_warn_and_are_dropped():
    f, y0, t = _spiral, torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0])
    with pytest.warns(UserWarning, match="Unexpected arguments"):
        ys = tdc.odeint(f, y0, t, method="dopri5", options={"step_size": 0.1, "perturb": True})
    assert torch.equal(ys, tdc.odeint(f, y0, t, method="dopri5"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchdiffeq drops these without a word
        tdc.odeint(f, y0, t, method="rk4", options={"norm": lambda e: e.abs().max(), "dtype": torch.float32})


def test_adjoint_options_must_be_given_for_another_adjoint_method():
    f, y0, t = _spiral, torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="adjoint_options"):
        tdc.odeint_adjoint(f, y0, t, adjoint_params=(), options={"first_step": 0.1}, adjoint_method="rk4")


def test_per_part_tolerances_are_unsupported():
    y0 = (torch.ones(2, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match="per-part"):
        tdc.odeint(lambda t, y: (-y[0], -y[1]), y0, torch.tensor([0.0, 1.0]), atol=(1e-6, 1e-9))
    ys = tdc.odeint(lambda t, y: (-y[0], -y[1]), y0, torch.tensor([0.0, 1.0]), atol=(1e-9, 1e-9))
    assert abs(ys[1][-1].item() - math.exp(-1)) < 1e-7


def test_complex_states_are_unsupported():
    with pytest.raises(NotImplementedError, match="view_as_real"):
        tdc.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.complex64), torch.tensor([0.0, 1.0]))


def test_t_on_another_device_is_coerced_with_a_warning():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    y0 = torch.ones(1, dtype=torch.float64, device="cuda")
    with pytest.warns(UserWarning, match="Coercing"):
        tdc.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------- the adjoint norm

def _seen_norm(xs_node_opts, calls):
    inner = xs_node_opts["norm"]

    def spy(tensors):
        calls.append(tuple(x.shape for x in tensors))
        return inner(tensors)

    xs_node_opts["norm"] = spy


@pytest.mark.parametrize("kwargs", [{}, {"adjoint_options": {"norm": "seminorm"}}])
def test_adjoint_norm_structure_tensor_state(kwargs):
    params = (torch.rand(7, requires_grad=True), torch.rand((), requires_grad=True))
    w = torch.tensor(0.3, requires_grad=True)
    xs = tdc.odeint_adjoint(lambda t, x: -x * params[1] + w * params[0].sum(), torch.ones(2, 3),
                            torch.tensor([0.0, 1.0]), adjoint_params=params, **kwargs)
    calls = []
    _seen_norm(xs.grad_fn.adjoint_options, calls)
    with pytest.warns(RuntimeWarning, match="not in adjoint_params"):
        xs.sum().backward()
    # torchdiffeq's structure: (t, y, adj_y, *adj_params), y in y0's shape.
    assert calls and set(calls) == {((), (2, 3), (2, 3), (7,), ())}
    assert params[0].grad is not None and w.grad is None  # w is not an adjoint parameter


def test_adjoint_norm_is_torchdiffeqs_mixed_norm_and_seminorm_drops_params():
    params = (torch.rand(7, requires_grad=True), torch.rand((), requires_grad=True))
    f = lambda t, x: -x * params[1]
    t, x0 = torch.tensor([0.0, 1.0]), torch.ones(3)
    full = tdc.odeint_adjoint(f, x0, t, adjoint_params=params).grad_fn.adjoint_options["norm"]
    semi = tdc.odeint_adjoint(f, x0, t, adjoint_params=params,
                              adjoint_options={"norm": "seminorm"}).grad_fn.adjoint_options["norm"]
    tup = (torch.tensor(0.1), torch.tensor([0.2, -0.3, 0.1]), torch.tensor([0.5, 0.0, 0.0]),
           torch.full((7,), 2.0), torch.tensor(-0.4))
    rms = lambda v: v.pow(2).mean().sqrt()
    assert torch.allclose(full(tup), torch.tensor(2.0))
    assert torch.allclose(semi(tup), max(tup[0].abs(), rms(tup[1]), rms(tup[2])))


def test_adjoint_norm_structure_tuple_state():
    params = (torch.rand(7, requires_grad=True),)
    x0 = (torch.tensor(1.0), torch.tensor([[0.5, 0.5], [0.1, 0.1]]))
    f = lambda t, x: (-x[0] * params[0].mean(), -x[1])
    calls, user_calls = [], []

    def user_norm(tensors):
        user_calls.append(tuple(x.shape for x in tensors))
        return max(x.abs().max() for x in tensors)

    xs = tdc.odeint_adjoint(f, x0, torch.tensor([0.0, 1.0]), adjoint_params=params,
                            adjoint_options={"norm": user_norm})
    # torchdiffeq's graph: the node carrying adjoint_options is two below each part.
    opts = xs[0].grad_fn.next_functions[0][0].next_functions[0][0].adjoint_options
    _seen_norm(opts, calls)
    (xs[0].sum() + xs[1].sum()).backward()
    assert set(calls) == {((), (5,), (5,), (7,))}  # the internal (flat) form
    assert set(user_calls) == {((), (), (2, 2), (), (2, 2), (7,))}  # the user's: the tuple's parts


@pytest.mark.filterwarnings("ignore:backward pass \\(backsolve\\)")  # the lax norm's backward is poor
def test_replaced_adjoint_norm_is_the_one_used():
    # A norm that accepts everything: the backward takes far fewer steps than with the default.
    params = (torch.tensor(1.5, requires_grad=True),)
    nfe = []
    for lax in (False, True):
        f = _Counted(lambda t, x: torch.sin(3 * t) * x * params[0])
        xs = tdc.odeint_adjoint(f, torch.ones(2), torch.tensor([0.0, 3.0]), adjoint_params=params)
        if lax:
            xs.grad_fn.adjoint_options["norm"] = lambda tensors: torch.tensor(0.0)
        f.n = 0
        xs.sum().backward()
        nfe.append(f.n)
    assert nfe[1] < nfe[0] / 2


class _Counted:
    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, x):
        self.n += 1
        return self.f(t, x)


# ------------------------------------------------------------------------------- f = y (aliased VJP)

@pytest.mark.parametrize("sensitivity", ["backsolve", "interpolated", "interpolating"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_field_gradient(sensitivity, dtype):
    # func returning y itself: autograd hands the adjoint vector back as the VJP (same storage);
    # it must not be negated in place (that flipped the adjoint state and stalled the solve).
    x0 = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    xs = pob.odeint(lambda t, x: x, x0, torch.tensor([0.0, 1.0]), sensitivity=sensitivity)
    xs.sum().backward()
    assert abs(x0.grad.item() - (1 + math.e)) < (1e-5 if dtype == torch.float32 else 1e-7)


# ------------------------------------------------------------------------------------------ odeint_dense

def test_odeint_dense():
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64, requires_grad=True)
    dense = tdc.odeint_dense(_spiral, y0, torch.tensor(0.0, dtype=torch.float64),
                             torch.tensor(3.0, dtype=torch.float64), rtol=1e-9, atol=1e-10)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=torch.float64)
    ts = torch.tensor([0.0, 0.7, 2.9, 3.0], dtype=torch.float64)
    out = dense(ts)
    exact = torch.stack([torch.linalg.matrix_exp(A * s) @ y0.detach() for s in ts])
    assert out.shape == (4, 2) and (out - exact).abs().max() < 1e-7
    assert dense(torch.tensor(0.7, dtype=torch.float64)).shape == (2,)
    g, = torch.autograd.grad(out[2].sum(), y0)  # differentiable like odeint's result
    assert (g - torch.linalg.matrix_exp(A * 2.9).sum(0)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="outside"):
        dense(torch.tensor(3.5, dtype=torch.float64))
