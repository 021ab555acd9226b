"""Every bad input or failed solve gives a clear error that names the problem (never a hang)."""
import math
import re
import time

import numpy as np
import pytest
import torch

import pyode_bridge as pob

f = lambda t, y: -y
Y0 = torch.ones(3)
T = torch.tensor([0.0, 1.0])


@pytest.mark.parametrize("t,match", [
    (torch.tensor([0.0, 1.0, 0.5]), "strictly increasing"),
    (torch.tensor([1.0, 0.0, 0.5]), "strictly decreasing"),
    (torch.tensor([0.0, 0.0, 1.0]), "strictly"),
    (torch.tensor([0.0, float("nan")]), "NaN"),
    (torch.tensor([0.0, float("inf")]), "Inf"),
    (torch.zeros(2, 2, 2), "1-D"),
    # A 2-D t is per-sample solving's (issue 18): one row of times per batch row of y0.
    (torch.zeros(2, 2), "t has 2 rows but y0 has batch size 3"),
    (torch.tensor([0, 1]), "floating-point"),
    (torch.tensor([]), "empty"),
])
def test_bad_time_grid(t, match):
    with pytest.raises(ValueError, match=match):
        pob.odeint(f, Y0, t)


def test_single_time_returns_y0_with_identity_gradient():
    out = pob.odeint(f, Y0, torch.tensor([0.0]))
    assert out.shape == (1, 3) and torch.equal(out[0], Y0)
    for sens in ("backprop", "checkpointed", "interpolated", "interpolating", "backsolve"):
        y0 = Y0.clone().requires_grad_()
        out = pob.odeint(f, y0, torch.tensor([0.0]), sensitivity=sens)
        (out * torch.arange(1.0, 4.0)).sum().backward()  # torchdiffeq returns y0[None] too
        assert torch.equal(y0.grad, torch.arange(1.0, 4.0)), sens


def test_bad_state():
    with pytest.raises(ValueError, match="dtype torch.int64"):
        pob.odeint(f, torch.ones(3, dtype=torch.long), T)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pob.odeint(f, torch.tensor([1.0, math.nan]), T)
    with pytest.raises(ValueError, match="different dtypes"):
        pob.odeint(lambda t, y: y, (torch.ones(2), torch.ones(2, dtype=torch.float64)), T)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        pob.odeint(f, [1.0, 2.0], T)


def test_dtype_mismatch_between_state_and_parameters():
    net = torch.nn.Linear(3, 3)  # float32
    with pytest.raises(ValueError, match="dtype torch.float32 but y0 has dtype torch.float64"):
        pob.odeint(lambda t, y: net(y), torch.ones(3, dtype=torch.float64), T.double())


def test_device_mismatch_is_named():
    meta_t = torch.tensor([0.0, 1.0], device="meta")
    with pytest.raises(ValueError, match="t is on the meta device"):  # no values: not a move
        pob.odeint(f, Y0, meta_t)
    net = torch.nn.Linear(3, 3).to("meta")
    with pytest.raises(ValueError, match=r"meta device \(no values\).*module.to_empty\(device='cpu'\)"):
        pob.odeint(lambda t, y: net(y), Y0, T)
    net.to_empty(device="cpu").reset_parameters()  # the fix the message names
    assert torch.isfinite(pob.odeint(lambda t, y: net(y), Y0, T)).all()


def test_unknown_method_option_sensitivity_backend():
    with pytest.raises(ValueError, match="valid methods.*dopri5"):
        pob.odeint(f, Y0, T, method="dopri9")
    with pytest.raises(ValueError, match="valid options"):
        pob.odeint(f, Y0, T, options={"stepsize": 0.1})
    with pytest.raises(ValueError, match="valid options"):
        pob.odeint(f, Y0, T, method="rk4", options={"first_step": 0.1})
    with pytest.raises(ValueError, match="unknown sensitivity.*checkpointed"):
        pob.odeint(f, Y0, T, sensitivity="adjoint")
    with pytest.raises(ValueError, match="unknown backend"):
        pob.odeint(f, Y0, T, backend="jax")
    with pytest.raises(ValueError, match="rtol"):
        pob.odeint(f, Y0, T, rtol=-1.0)


def test_wrong_output_shape_and_structure():
    with pytest.raises(pob.SolverError, match=r"shape \(2,\) at t=0.*same shape"):
        pob.odeint(lambda t, y: y[:2], Y0, T)
    with pytest.raises(pob.SolverError, match="single tensor"):
        pob.odeint(lambda t, y: y[0], (Y0, Y0), T)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4", "euler"])
def test_nan_from_func_mid_solve_is_reported_with_time(method):
    def g(t, y):
        return -y if t < 0.5 else y * float("nan")

    opts = {"step_size": 0.05} if method in ("rk4", "euler") else None
    with pytest.raises(pob.SolverError, match=rf"forward solve with method '{method}'") as info:
        pob.odeint(g, Y0, T, method=method, options=opts)
    msg = str(info.value)
    assert "NaN/Inf" in msg and ("t=0.5" in msg or "t=0.45" in msg), msg


def test_finite_time_blow_up_underflows_not_hangs():
    start = time.perf_counter()
    with pytest.raises(pob.SolverError, match="(underflow|max_num_steps|NaN)"):
        pob.odeint(lambda t, y: y ** 2, torch.ones(1, dtype=torch.float64),
                   torch.tensor([0.0, 2.0], dtype=torch.float64))  # y = 1/(1-t) blows up at t=1
    assert time.perf_counter() - start < 10


def test_max_num_steps():
    with pytest.raises(pob.SolverError, match=r"max_num_steps=5 at t=.*raise options"):
        pob.odeint(lambda t, y: torch.cos(50 * t) * y, torch.ones(1), torch.tensor([0.0, 10.0]),
                   options={"max_num_steps": 5})


def test_a_grid_over_max_num_steps_without_a_method_still_names_the_fix():
    # make_grid's method is optional; its step-count error used to read method.name and fail with
    # an AttributeError on None instead of the SolverError.
    from pyode_bridge.solvers import make_grid
    with pytest.raises(pob.SolverError, match=r"^backward pass: the fixed grid of step_size=0.01 .* 100 steps, "
                                              r"more than max_num_steps=10; raise options"):
        make_grid(0.0, 1.0, 0.01, None, [0.0, 1.0], max_num_steps=10, context="backward pass")
    assert len(make_grid(0.0, 1.0, 0.01, None, [0.0, 1.0], max_num_steps=100)) == 101


def test_bad_grid_option():
    with pytest.raises(ValueError, match="grid.*must start"):
        pob.odeint(f, Y0, T, method="rk4", options={"grid": [0.0, 0.5]})
    with pytest.raises(ValueError, match="step_size"):
        pob.odeint(f, Y0, T, method="rk4", options={"step_size": -0.1})


# ----------------------------------------------------------------------------------------------
# Each message names the problem and a fix; the fix it suggests is run here and must work.


def _error(exc, call):
    with pytest.raises(exc) as info:
        call()
    return str(info.value)


def _code(msg, pattern):
    """The code a message suggests (group 1 of ``pattern``), checked to be there."""
    m = re.search(pattern, msg)
    assert m, msg
    return m.group(1)


@pytest.mark.parametrize("ts,names,code", [
    ([0.0, 0.0, 1.0], r"t\[0\] = t\[1\] = 0", r"t = (torch\.unique\(t\))"),
    ([1.0, 0.0, 0.0], r"t\[1\] = t\[2\] = 0", r"t = (torch\.unique\(t\)\.flip\(0\))"),
])
def test_repeated_time_is_named_and_its_fix_works(ts, names, code):
    t = torch.tensor(ts)
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, t))
    assert re.search(names, msg) and "equal times are not allowed" in msg, msg
    assert "decreasing" in msg and "increasing" in msg  # either direction is fine; no wrong word
    fixed = eval(_code(msg, code), {"torch": torch, "t": t})
    assert (fixed[-1] - fixed[0]) * (ts[-1] - ts[0]) > 0  # the direction of integration is kept
    out = pob.odeint(f, Y0, fixed)
    torch.testing.assert_close(out[-1], Y0 * math.exp(-(ts[-1] - ts[0])))


@pytest.mark.parametrize("ts,way,pair", [
    ([0.0, 1.0, 0.5], "increasing", "t[2]=0.5 < t[1]=1"),
    ([1.0, 0.0, 0.5], "decreasing", "t[2]=0.5 > t[1]=0"),
    ([0.0, 1.0 + 2e-12, 1.0 + 1e-12], "increasing", "t[2]=1.000000000001 < t[1]=1.000000000002"),
])
def test_out_of_order_time_names_the_pair_and_sorting_fixes_it(ts, way, pair):
    t = torch.tensor(ts, dtype=torch.float64)
    msg = _error(ValueError, lambda: pob.odeint(f, Y0.double(), t))
    assert f"strictly {way}" in msg and pair in msg, msg
    fixed = eval(_code(msg, r"sort the times: (t\.sort\([^)]*\)\.values)"), {"t": t})
    assert pob.odeint(f, Y0.double(), fixed).shape == (3, 3)


def test_integer_output_of_func_gets_a_cast_that_works():
    g = lambda t, y: torch.arange(3)  # int64
    msg = _error(ValueError, lambda: pob.odeint(g, Y0, T))
    assert "dtype torch.int64" in msg and "floating" in msg, msg
    assert "y0.to(torch.int64)" not in msg  # the old advice, which only leads to the next error
    cast = _code(msg, r"return (dy\.to\(y\.dtype\))")
    fixed = lambda t, y: eval(cast, {"dy": g(t, y), "y": y})
    torch.testing.assert_close(pob.odeint(fixed, Y0, T)[-1], Y0 + torch.arange(3.0))


def test_float64_output_for_a_float32_state_both_fixes_work():
    c = torch.tensor([2.0], dtype=torch.float64)
    g = lambda t, y: -c * y  # promotes a float32 y to float64
    msg = _error(ValueError, lambda: pob.odeint(g, Y0, T))
    assert "dtype torch.float64 for a state of dtype torch.float32" in msg, msg
    assert ".to(y.dtype)" in msg and "y0.to(torch.float64)" in msg, msg
    expect = torch.full((3,), math.exp(-2.0))
    out32 = pob.odeint(lambda t, y: g(t, y).to(y.dtype), Y0, T)[-1]
    out64 = pob.odeint(g, Y0.to(torch.float64), T)[-1]
    torch.testing.assert_close(out32, expect)
    torch.testing.assert_close(out64, expect.double())


def test_tuple_part_of_the_wrong_dtype_names_that_part():
    msg = _error(ValueError, lambda: pob.odeint(lambda t, y: (-y[0], y[1].long()),
                                                (Y0, torch.ones(2)), T))
    assert "component 1" in msg and "y[1].to(y[1].dtype)" not in msg and "dy.to(y[1].dtype)" in msg


def test_empty_state_says_what_to_pass():
    msg = _error(ValueError, lambda: pob.odeint(f, torch.ones(0), T))
    assert "empty (shape (0,))" in msg and "torch.zeros(n) with n >= 1" in msg, msg
    msg = _error(ValueError, lambda: pob.odeint(f, (), T))
    assert "empty tuple" in msg and "torch.zeros(n)" in msg, msg
    msg = _error(ValueError, lambda: pob.odeint(lambda t, y: (-y[0], y[1]), (Y0, torch.ones(0)), T))
    assert "y0[1] is empty" in msg and "leave that part out" in msg, msg


@pytest.mark.parametrize("y0,code", [
    ([1.0, 2.0], r"(torch\.tensor\(y0, dtype=torch\.float32\))"),
    ([1, 2], r"(torch\.tensor\(y0, dtype=torch\.float32\))"),  # ints too: no second error
    (1.5, r"(torch\.tensor\(\[1\.5\]\))"),
    (3, r"(torch\.tensor\(\[3\.0\]\))"),
    (np.arange(3), r"(torch\.as_tensor\(y0, dtype=torch\.float32\))"),
])
def test_state_that_is_not_a_tensor_gets_a_conversion_that_works(y0, code):
    msg = _error(ValueError, lambda: pob.odeint(f, y0, T))
    fixed = eval(_code(msg, code), {"torch": torch, "y0": y0})
    out = pob.odeint(f, fixed, T)
    torch.testing.assert_close(out[-1], fixed * math.exp(-1.0))


def test_mixed_dtype_tuple_fix_works():
    y0 = (torch.ones(2), torch.ones(2, dtype=torch.float64))
    g = lambda t, y: (-y[0], -y[1])
    msg = _error(ValueError, lambda: pob.odeint(g, y0, T))
    fixed = eval(_code(msg, r"y0 = (tuple\(p\.double\(\) for p in y0\))"), {"y0": y0})
    assert all(p.dtype == torch.float64 for p in pob.odeint(g, fixed, T.double()))


def test_complex_state_fix_works():
    y0 = torch.tensor([1.0 + 1.0j])
    msg = _error(ValueError, lambda: pob.odeint(f, y0, T))
    fixed = eval(_code(msg, r"pass (torch\.view_as_real\(y0\))"), {"torch": torch, "y0": y0})
    out = torch.view_as_complex(pob.odeint(f, fixed, T)[-1].contiguous())
    torch.testing.assert_close(out, y0 * math.exp(-1.0))


def test_nan_in_state_names_the_entry():
    y0 = torch.ones(2, 3)
    y0[1, 2] = math.nan
    msg = _error(ValueError, lambda: pob.odeint(f, y0, T))
    assert "NaN or Inf (at 1 entry, the first at index (1, 2))" in msg and "torch.isfinite(y0)" in msg
    msg = _error(ValueError, lambda: pob.odeint(lambda t, y: y, (Y0, y0), T))
    assert "part(s) y0[1]" in msg and "torch.isfinite(y0[1])" in msg, msg


@pytest.mark.parametrize("t,code", [
    (torch.tensor(1.0), r"(torch\.tensor\(\[0\.0, 1\.0\]\))"),
    (torch.tensor([[0.0], [0.5], [1.0]]), r"(t\.reshape\(-1\))"),
    (torch.tensor([]), r"(torch\.tensor\(\[0\.0, 1\.0\]\))"),
    ("0 to 1", r"(torch\.linspace\(0\.0, 1\.0, 10\))"),
])
def test_bad_time_shape_gets_a_fix_that_works(t, code):
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, t))
    fixed = eval(_code(msg, code), {"torch": torch, "t": t})
    torch.testing.assert_close(pob.odeint(f, Y0, fixed)[-1], Y0 * math.exp(-1.0))


def test_time_grids_in_a_batch_are_refused_with_the_alternative():
    # A 2-D t is one row of times per sample (issue 18): its rows must match y0's batch.
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, torch.rand(4, 3).sort(1).values))
    assert "t has 4 rows but y0 has batch size 3" in msg and "one row of times per sample" in msg, msg
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, torch.rand(2, 4, 3).sort(2).values))
    assert "shape (2, 4, 3)" in msg and "solve once per grid" in msg, msg


def test_nonfinite_times_are_located():
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, torch.tensor([0.0, 1.0, math.inf])))
    assert "Inf at index [2]" in msg and "finite" in msg, msg


@pytest.mark.parametrize("g,says,fix", [
    (lambda t, y: None, "NoneType", "does func end with a return statement"),
    (lambda t, y: 2.0, "float", "torch.full_like(y, 2.0)"),
    (lambda t, y: -y.numpy(), "ndarray", "torch operations"),
    (lambda t, y: torch.ones(1), r"shape (1,)", "dy.expand_as(y)"),
    (lambda t, y: (-y,), "a tuple of 1", "not a tuple"),
])
def test_wrong_output_of_func_names_the_fix(g, says, fix):
    msg = _error(pob.SolverError, lambda: pob.odeint(g, Y0, T))
    assert says in msg and fix in msg, msg


def test_suggested_output_fixes_work():
    out = pob.odeint(lambda t, y: torch.full_like(y, 2.0), Y0, T)[-1]
    torch.testing.assert_close(out, Y0 + 2.0)
    out = pob.odeint(lambda t, y: torch.ones(1).expand_as(y), Y0, T)[-1]
    torch.testing.assert_close(out, Y0 + 1.0)
    msg = _error(pob.SolverError, lambda: pob.odeint(lambda t, y: y[0], (Y0, Y0), T))
    assert "return a tuple of 2 tensors" in msg, msg


def test_option_values_that_are_not_numbers_name_the_option():
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, T, method="rk4", options={"step_size": "0.1s"}))
    assert "options['step_size'] must be a number, got '0.1s'" in msg
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, T, options={"first_step": None}))
    assert "options['first_step'] must be a number" in msg
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, T, rtol=0, atol=0))
    assert "atol=1e-9" in msg
    torch.testing.assert_close(pob.odeint(f, Y0, T, rtol=0, atol=1e-9)[-1], Y0 * math.exp(-1.0))


# ----------------------------------------------------------------------------------------------
# Options: each bad value is refused up front with a ValueError that names the option.

_NORM_VECTOR = lambda e: e.abs()  # noqa: E731 - one number per entry, not one number


@pytest.mark.parametrize("method,options,names", [
    ("dopri5", {"dtype": torch.int64}, "options['dtype']"),
    ("dopri5", {"dtype": torch.bool}, "options['dtype']"),
    ("dopri5", {"dtype": "float64"}, "options['dtype']"),
    ("dopri5", {"dtype": float}, "options['dtype']"),
    ("rk4", {"grid": []}, "options['grid']"),
    ("rk4", {"grid": [0.0]}, "options['grid']"),
    ("rk4", {"grid": [0.0, 0.6, 0.4, 1.0]}, "options['grid'] must be strictly monotone"),
    ("rk4", {"grid": [0.0, 0.5, 0.5, 1.0]}, "options['grid'] must be strictly monotone"),
    ("rk4", {"grid": [0.0, float("nan"), 1.0]}, "options['grid'] contains NaN"),
    ("rk4", {"grid": torch.zeros(2, 2)}, "options['grid']"),
    ("rk4", {"grid": ["a", "b"]}, "options['grid']"),
    ("rk4", {"step_size": 0.1, "grid": [0.0, 1.0]}, "step_size and grid are mutually exclusive"),
    ("dopri5", {"max_num_steps": 2.5}, "options['max_num_steps'] must be a positive integer"),
    ("dopri5", {"max_num_steps": "100"}, "options['max_num_steps'] must be a positive integer"),
    ("dopri5", {"max_num_steps": True}, "options['max_num_steps'] must be a positive integer"),
    ("dopri5", {"max_num_steps": -5}, "options['max_num_steps'] must be a positive integer"),
    ("dopri5", {"max_num_steps": float("inf")}, "options['max_num_steps'] must be a positive integer"),
    ("dopri5", {"norm": _NORM_VECTOR}, r"options\['norm'\] must return one number"),
    ("dopri5", {"norm": lambda e: None}, r"options\['norm'\] must return one number"),
    ("rk4", {"step_size": float("nan")}, "options['step_size']"),
    ("rk4", {"step_size": True}, "options['step_size']"),
    ("dopri5", {"first_step": 0.0}, "options['first_step']"),
    ("dopri5", {"first_step": float("inf")}, "options['first_step']"),
    ("dopri5", {"max_step": float("nan")}, "options['max_step']"),
    ("dopri5", {"min_step": -1.0}, "options['min_step']"),
    ("dopri5", {"safety": 1.5}, "options['safety']"),
    ("dopri5", {"ifactor": 0.5}, "options['ifactor']"),
    ("dopri5", {"dfactor": 1.0}, "options['dfactor']"),
    ("dopri5", {"dfactor": float("nan")}, "options['dfactor']"),
    ("dopri5", {"beta": 0.5}, "options['beta']"),
    ("dopri5", {"jump_t": [0.5, float("nan")]}, "options['jump_t'] contains NaN"),
    ("dopri5", {"step_t": [float("inf")]}, "options['step_t'] contains NaN or Inf"),
    ("radauIIA3", {"step_size": 0.1, "newton_tol": "1e-8"}, "options['newton_tol']"),
    ("radauIIA3", {"step_size": 0.1, "max_newton_iters": 2.5}, "options['max_newton_iters']"),
])
def test_bad_option_values_name_the_option(method, options, names):
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, T, method=method, options=options))
    assert re.search(names if "\\" in names else re.escape(names), msg), msg


@pytest.mark.parametrize("tol", [True, -1e-3, float("nan"), "1e-3", torch.tensor(1e-3, device="meta")])
def test_bad_tolerances_name_the_tolerance(tol):
    assert "rtol" in _error(ValueError, lambda: pob.odeint(f, Y0, T, rtol=tol))


def test_option_dtype_is_the_dtype_of_t_in_func():
    # An integer dtype used to round t (0.047 became 1.0, silently); a floating one is honoured.
    seen = []
    rate = lambda t, y: (seen.append(t.dtype), -3.0 * y)[1]
    ys = pob.odeint(rate, torch.ones(1, dtype=torch.float64), T, options={"dtype": torch.float32})
    assert set(seen) == {torch.float32}
    assert abs(ys[-1].item() - math.exp(-3.0)) < 1e-6


@pytest.mark.parametrize("which", ["y0", "t"])
def test_meta_tensors_are_refused(which):
    y0 = torch.ones(3, device="meta") if which == "y0" else Y0
    t = torch.tensor([0.0, 1.0], device="meta") if which == "t" else T
    msg = _error(ValueError, lambda: pob.odeint(f, y0, t))
    assert f"{which} is on the meta device" in msg, msg


def test_options_that_are_not_a_dict_and_meta_times_are_named():
    assert "options must be a dict" in _error(ValueError, lambda: pob.odeint(f, Y0, T, options=[("a", 1)]))
    msg = _error(ValueError, lambda: pob.odeint(f, Y0, T, options={"jump_t": torch.ones(1, device="meta")}))
    assert "options['jump_t'] is on the meta device" in msg, msg


def test_integral_float_max_num_steps_is_an_int():
    s = pob.SolveStats()
    pob.odeint(f, Y0, T, options={"max_num_steps": 1e4}, stats=s)
    assert 0 < s.steps_forward


def test_norm_of_a_tuple_state_returning_a_tuple_is_named():
    msg = _error(ValueError, lambda: pob.odeint(lambda t, y: (-y[0], -y[1]), (Y0, Y0), T,
                                                options={"norm": lambda e: (e[0].abs().max(), 0.0)}))
    assert "options['norm'] must return one number" in msg, msg


# ----------------------------------------------------------------------------------------------
# A fixed grid of more than max_num_steps steps is refused before it is built.

_HUGE = 10 ** 6 + 1  # grid points, against max_num_steps=1000


@pytest.mark.parametrize("method", ["rk4", "euler", "explicit_adams", "implicit_adams", "radauIIA3"])
@pytest.mark.parametrize("options", [
    {"step_size": 1e-12},
    {"step_size": 1e-12, "max_num_steps": 10 ** 9},
    {"grid": torch.linspace(0.0, 1.0, _HUGE, dtype=torch.float64), "max_num_steps": 1000},
    {"grid_constructor": lambda func, y0, t: torch.linspace(0.0, 1.0, _HUGE, dtype=torch.float64),
     "max_num_steps": 1000},
    {"max_num_steps": 1000},  # the output times t are the grid (t below)
], ids=["step_size", "step_size_large_cap", "grid", "grid_constructor", "output_times"])
def test_too_many_fixed_steps_fail_at_once_without_building_the_grid(method, options):
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        t = torch.linspace(0.0, 1.0, 20001) if options == {"max_num_steps": 1000} else T
        msg = _error(pob.SolverError, lambda: pob.odeint(f, Y0, t, method=method, options=options))
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "steps, more than max_num_steps=" in msg and "raise options={'max_num_steps'" in msg, msg
    # A list of 10**6 Python floats alone is 32 MB; 10**12 of them never finished.
    assert peak < 4e6, peak
    assert elapsed < 0.5, elapsed


def test_torchdiffeq_shim_refuses_a_grid_beyond_any_cap():
    from pyode_bridge import torchdiffeq as tdq

    start = time.perf_counter()
    with pytest.raises(pob.SolverError, match="1000000000000 steps"):
        tdq.odeint(f, Y0, T, method="rk4", options={"step_size": 1e-12})
    assert time.perf_counter() - start < 0.5


def test_checkpointed_names_the_segment_where_a_parameter_gradient_turns_inf():
    # d sqrt(b)/db is inf at b=0, and func uses sqrt(b) only before t=0.25: the backward (from t=1)
    # meets it in the segment [0.2, 0.3]; the first segment's sum, added into later, must not be blamed.
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return -a * y + (b.sqrt() if float(t) < 0.25 else 0.0 * b)

    y = pob.odeint(f, torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
                   method="rk4", options={"step_size": 0.1}, sensitivity="checkpointed")
    with pytest.raises(pob.SolverError, match=r"NaN/Inf between t=0\.2 and t=0\.3"):
        y[-1].sum().backward()
