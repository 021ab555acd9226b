"""Property-based robustness of ``odeint`` over its whole argument space (hypothesis).

Every call, for random shapes, dtypes, tuple states, time grids (increasing, decreasing, with
duplicates, NaN or Inf), tolerances from 1e-12 to 1e-1, every method, every option and every
gradient method, forward and backward, must do one of two things:

* return a finite result of the right structure, shape and dtype whose first row is ``y0``, and
  (after ``.backward()``) finite gradients of the right shapes and dtypes for ``y0`` and the
  parameters; or
* raise one of the documented errors - ``ValueError`` for bad input, ``pob.SolverError`` for a
  failed solve - with a message that names the problem (the time, the method and the direction).

No call may hang (every solve is bounded by a modest ``max_num_steps``; each test has a wall-clock
bound) or return NaN silently. Further properties on valid input: the forward values do not depend
on the gradient method, ``checkpointed`` equals ``backprop`` exactly, and the adjoint methods
converge to it at tight tolerances. The examples are derandomized and the example database is off,
so a CI run is reproducible.

Bugs found by random runs of these strategies (thousands of examples) are pinned by deterministic
regression tests, here (explicit ``@example``s) and in test_faults.py, rather than by the
derandomized sample.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import pyode_bridge as pob

torch.set_num_threads(1)

METHODS = ["dopri5", "tsit5", "bosh3", "adaptive_heun", "euler", "midpoint", "rk4"]
FIXED = {"euler", "midpoint", "rk4"}
SENSITIVITY_NAMES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve"]
DTYPES = [torch.float32, torch.float64]

# Each example's solves are bounded by max_num_steps (<= 120 steps of <= 7 evaluations of a tiny
# func): a healthy example takes milliseconds, so the deadline only catches a hang or a runaway.
PROPERTY_SETTINGS = settings(max_examples=400, deadline=20_000, derandomize=True, database=None,
                             print_blob=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                    HealthCheck.filter_too_much])


# --- right-hand sides ----------------------------------------------------------------------------


class RHS(nn.Module):
    """A right-hand side acting on the flattened (tuple) state, returning ``y``'s structure.

    ``linear``: ``A y`` with a random matrix (spectral radius ~``scale``); ``mlp``: a time-dependent
    tanh MLP; ``blowup``: ``c * y**2 + A y``, which blows up in finite time for some draws.
    """

    def __init__(self, kind: str, shapes, dtype, seed: int, scale: float, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = sum(math.prod(s) for s in shapes)
        self.kind, self.shapes = kind, [tuple(s) for s in shapes]
        self.numels = [math.prod(s) for s in shapes]

        def rand(*size, s=1.0):
            return nn.Parameter((torch.randn(*size, generator=g, dtype=torch.float64) * s).to(dtype))

        if kind in ("linear", "blowup"):
            self.A = rand(n, n, s=scale / math.sqrt(n))
        if kind == "blowup":
            self.c = rand(n, s=scale)
        if kind == "mlp":
            self.W1 = rand(hidden, n, s=scale / math.sqrt(n))
            self.b1 = rand(hidden, s=0.5)
            self.w_t = rand(hidden, s=0.5)
            self.W2 = rand(n, hidden, s=1.0 / math.sqrt(hidden))

    def forward(self, t, y):
        parts = y if isinstance(y, tuple) else (y,)
        z = torch.cat([p.reshape(-1) for p in parts])
        if self.kind == "linear":
            dz = self.A @ z
        elif self.kind == "blowup":
            dz = self.c * z * z + self.A @ z
        else:
            tt = t.to(z.dtype)
            dz = self.W2 @ torch.tanh(self.W1 @ z + self.b1 + tt * self.w_t)
        out = tuple(d.view(s) for d, s in zip(dz.split(self.numels), self.shapes))
        return out if isinstance(y, tuple) else out[0]


# --- strategies ----------------------------------------------------------------------------------

shapes_st = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


@st.composite
def states(draw, dtypes=tuple(DTYPES)):
    dtype = draw(st.sampled_from(dtypes))
    is_tuple = draw(st.booleans())
    shapes = draw(st.lists(shapes_st, min_size=2, max_size=3)) if is_tuple else [draw(shapes_st)]
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mag = draw(st.sampled_from([0.1, 1.0, 3.0]))
    parts = [(torch.randn(s, generator=g, dtype=torch.float64) * mag).to(dtype) for s in shapes]
    return dtype, is_tuple, shapes, parts


@st.composite
def time_grids(draw, valid_only=False):
    """``(kind, times)``: kind is the expected verdict of the validation."""
    kind = draw(st.sampled_from(["increasing"] * 4 + ["decreasing"] * 3 + (
        ["single", "duplicate", "non_monotone", "nan", "inf"] if not valid_only else [])))
    n = draw(st.integers(2, 5))
    start = draw(st.sampled_from([0.0, -1.0, 0.5, 2.0]))
    gaps = draw(st.lists(st.floats(0.05, 1.0, allow_nan=False), min_size=n - 1, max_size=n - 1))
    ts = [start]
    for gp in gaps:
        ts.append(ts[-1] + gp)
    if kind == "decreasing":
        ts = [2 * start - x for x in ts]
    elif kind == "single":
        ts = ts[:1]
    elif kind == "duplicate":
        i = draw(st.integers(0, len(ts) - 1))
        ts.insert(i, ts[i])
    elif kind == "non_monotone":
        if len(ts) == 2:
            ts.append(ts[0] + 0.5 * gaps[0])  # up then down
        else:
            i = draw(st.integers(0, len(ts) - 3))
            ts[i + 1], ts[i + 2] = ts[i + 2], ts[i + 1]
    elif kind in ("nan", "inf"):
        i = draw(st.integers(0, len(ts) - 1))
        ts[i] = math.nan if kind == "nan" else draw(st.sampled_from([math.inf, -math.inf]))
    return kind, ts


log_tol = st.floats(-12.0, -1.0, allow_nan=False).map(lambda e: 10.0 ** e)


@st.composite
def options_for(draw, method, ts):
    opts = {"max_num_steps": draw(st.sampled_from([40, 120]))}
    valid = len(ts) >= 2 and all(math.isfinite(x) for x in ts)
    choice = draw(st.sampled_from(["none", "step_size", "grid", "adaptive"]))
    if choice == "step_size":
        opts["step_size"] = draw(st.sampled_from([0.05, 0.13, 0.5, 10.0]))
    elif choice == "grid" and valid:
        lo, hi = ts[0], ts[-1]
        inner = draw(st.lists(st.floats(0.01, 0.99), max_size=6))
        # Step boundaries strictly inside (t0, t_end), in the direction of integration.
        inner = sorted({lo + u * (hi - lo) for u in inner}, key=lambda x: (x - lo) / (hi - lo))
        opts["grid"] = [lo] + inner + [hi]
    elif choice == "adaptive" and method not in FIXED:
        if draw(st.booleans()):
            opts["first_step"] = draw(st.sampled_from([1e-6, 1e-2, 0.3, 5.0]))
        if draw(st.booleans()):
            opts["max_step"] = draw(st.sampled_from([0.05, 0.4, math.inf]))
        if draw(st.booleans()):
            opts["dtype"] = draw(st.sampled_from(DTYPES))
    return opts


sensitivities = st.one_of(
    st.sampled_from(SENSITIVITY_NAMES),
    st.integers(1, 4).map(lambda k: pob.Checkpointed(every=k)),
    st.sampled_from([2, 5, "auto"]).map(lambda n: pob.Interpolated(nodes=n)),
    st.tuples(st.booleans(), st.sampled_from([None, 1, 3])).map(
        lambda a: pob.Interpolating(checkpointing=a[0], every=a[1])),
    st.sampled_from(["ignore", "warn", "raise"]).map(lambda p: pob.Backsolve(on_instability=p)),
)


@st.composite
def adjoint_kwargs(draw, method):
    """Backward-solve settings of the adjoint methods (ignored by backprop and checkpointed)."""
    choice = draw(st.sampled_from(["none", "none", "tolerances", "method"]))
    if choice == "tolerances":
        return {"adjoint_rtol": draw(log_tol), "adjoint_atol": draw(log_tol)}
    if choice == "method":
        return {"adjoint_method": draw(st.sampled_from(METHODS)),
                "adjoint_options": {"max_num_steps": 120}}
    return {}


@st.composite
def problems(draw, valid_only=False, dtypes=tuple(DTYPES)):
    dtype, is_tuple, shapes, parts = draw(states(dtypes))
    kind = draw(st.sampled_from(["linear", "mlp", "blowup"]))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    module = RHS(kind, shapes, dtype, draw(st.integers(0, 2**16)), scale)
    # A module, or a plain closure over it (the parameters are then found through the closure).
    func = module if draw(st.booleans()) else (lambda t, y: module(t, y))
    t_kind, ts = draw(time_grids(valid_only))
    t_form = draw(st.sampled_from(["same", "same", "other", "list"]))
    # The times as odeint will see them (a list is converted with y0's dtype).
    ts = torch.tensor(ts, dtype=_t_dtype(dtype, t_form)).tolist()
    method = draw(st.sampled_from(METHODS))
    return dict(
        dtype=dtype, is_tuple=is_tuple, shapes=shapes, parts=parts, module=module, func=func,
        t_kind=t_kind, ts=ts, t_form=t_form, method=method, rtol=draw(log_tol), atol=draw(log_tol),
        options=draw(options_for(method, ts)), sensitivity=draw(sensitivities),
        adjoint=draw(adjoint_kwargs(method)), y0_grad=draw(st.booleans()),
        frozen=draw(st.sampled_from([0, 0, 0, 1])),  # leading parameters that do not require grad
    )


# --- the oracle ----------------------------------------------------------------------------------


def _t_dtype(dtype, t_form):
    if t_form == "other":
        return torch.float64 if dtype == torch.float32 else torch.float32
    return dtype


def _t_tensor(p):
    if p["t_form"] == "list":
        return list(p["ts"])
    return torch.tensor(p["ts"], dtype=_t_dtype(p["dtype"], p["t_form"]))


def _method_of(p, phase):
    """The method a SolverError of ``phase`` must name (the backward one may be another)."""
    if phase == "backward" and not _exact_backward(p["sensitivity"]):
        return p["adjoint"].get("adjoint_method", p["method"])
    return p["method"]


def _exact_backward(sens):
    """``backprop`` and ``checkpointed`` differentiate the forward's own steps."""
    name = sens if isinstance(sens, str) else sens.name
    return name in ("backprop", "checkpointed")


def _expected_value_error(p, grad_needed):
    """The substring the ValueError must contain, or None when the input is valid."""
    # A single time is valid (y0[None], identity gradient), with or without gradients.
    return {"nan": "NaN", "inf": "Inf", "duplicate": "strictly", "non_monotone": "strictly"}.get(p["t_kind"])


SOLVER_ERROR = re.compile(r"(forward solve|backward pass \([a-z ,-]+\)) with method '([a-z_0-9]+)'")


def _check_solver_error(e, p, phase):
    msg = str(e)
    m = SOLVER_ERROR.search(msg)
    assert m, f"SolverError does not say where it happened: {msg}"
    assert m.group(2) == _method_of(p, phase), msg
    assert m.group(1).startswith("forward" if phase == "forward" else "backward"), msg
    assert re.search(r"t=-?[0-9.]", msg), f"SolverError does not name the time: {msg}"


def _structure_ok(ys, p, n_times):
    outs = ys if p["is_tuple"] else (ys,)
    assert isinstance(ys, tuple) == p["is_tuple"]
    assert len(outs) == len(p["parts"])
    for y, y0 in zip(outs, p["parts"]):
        assert isinstance(y, torch.Tensor)
        assert y.shape == (n_times, *y0.shape), (y.shape, y0.shape)
        assert y.dtype == p["dtype"]
        assert bool(torch.isfinite(y).all()), "odeint returned NaN/Inf without raising"
        torch.testing.assert_close(y[0].detach(), y0.detach(), rtol=0, atol=0)


def run_property(p, grad=True):
    """One odeint call (and its backward) checked against the documented contract."""
    parts = [x.clone().requires_grad_(p["y0_grad"] and grad) for x in p["parts"]]
    y0 = tuple(parts) if p["is_tuple"] else parts[0]
    all_params = list(p["module"].parameters())
    for i, q in enumerate(all_params):
        q.requires_grad_(grad and i >= p["frozen"])
        q.grad = None
    params = [q for q in all_params if q.requires_grad]
    grad_needed = grad and (p["y0_grad"] or bool(params))
    expect = _expected_value_error(p, grad_needed)
    kwargs = dict(rtol=p["rtol"], atol=p["atol"], method=p["method"], options=dict(p["options"]),
                  sensitivity=p["sensitivity"], **p["adjoint"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # backsolve's instability guard ("warn")
        try:
            with torch.set_grad_enabled(grad):
                ys = pob.odeint(p["func"], y0, _t_tensor(p), **kwargs)
        except ValueError as e:
            assert not isinstance(e, pob.SolverError)
            assert expect is not None, f"ValueError for a valid input: {e}"
            assert expect in str(e), f"{expect!r} not in {e}"
            return "value_error"
        except pob.SolverError as e:
            assert expect is None, f"expected ValueError({expect!r}), got SolverError: {e}"
            _check_solver_error(e, p, "forward")
            return "forward_error"
        assert expect is None, f"expected ValueError({expect!r}), odeint returned"
        n_times = len(p["ts"])
        _structure_ok(ys, p, n_times)
        if not grad_needed or (n_times == 1 and not p["y0_grad"]):
            return "ok"  # (a single time returns y0 itself: nothing to differentiate)
        outs = ys if p["is_tuple"] else (ys,)
        g = torch.Generator().manual_seed(n_times)
        loss = sum((y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum()
                   for y in outs)
        try:
            loss.backward()
        except pob.SolverError as e:
            _check_solver_error(e, p, "backward")
            for x in parts + all_params:
                assert x.grad is None, "a failed backward left a partial gradient"
            return "backward_error"
    # With a single time the output is y0 itself: parameters get no gradient (as in torchdiffeq).
    for x in (parts if p["y0_grad"] else []) + (params if len(p["ts"]) > 1 else []):
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
        assert bool(torch.isfinite(x.grad).all()), "the backward returned NaN/Inf without raising"
    for q in all_params[:p["frozen"]]:
        assert q.grad is None, "a parameter that does not require grad received a gradient"
    return "ok"


# --- the properties ------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@PROPERTY_SETTINGS
@given(problems())
def test_odeint_returns_finite_or_raises_documented_error(p):
    event(run_property(p, grad=True))


@pytest.mark.timeout(120)
@settings(PROPERTY_SETTINGS, max_examples=150)
@given(problems())
def test_odeint_without_grad_returns_finite_or_raises_documented_error(p):
    event(run_property(p, grad=False))


@pytest.mark.timeout(120)
@settings(PROPERTY_SETTINGS, max_examples=100)
@given(problems(valid_only=True))
def test_forward_values_do_not_depend_on_the_gradient_method(p):
    """Every gradient method runs the same forward solve: its outputs equal the plain solve's."""
    t = _t_tensor(p)
    kwargs = dict(rtol=p["rtol"], atol=p["atol"], method=p["method"], options=dict(p["options"]))
    parts = [x.clone().requires_grad_(True) for x in p["parts"]]
    y0 = tuple(parts) if p["is_tuple"] else parts[0]
    try:
        with torch.no_grad():
            ref = pob.odeint(p["func"], y0, t, **kwargs)
    except pob.SolverError:
        return
    with warnings.catch_warnings():
        # A guard's warning is about the gradient, and this property is about the forward values.
        warnings.simplefilter("ignore", pob.AccuracyWarning)
        ys = pob.odeint(p["func"], y0, t, sensitivity=p["sensitivity"], **kwargs)
    for a, b in zip(ys if p["is_tuple"] else (ys,), ref if p["is_tuple"] else (ref,)):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


@pytest.mark.timeout(120)
@settings(PROPERTY_SETTINGS, max_examples=100)
@given(problems(valid_only=True, dtypes=(torch.float64,)), st.integers(1, 3))
def test_checkpointed_gradient_equals_backprop_for_any_valid_input(p, every):
    """``checkpointed`` is the exact gradient of the discrete solve: equal to ``backprop``'s on any
    grid, direction, structure and step option (float64, where round-off is far below the check)."""
    t = _t_tensor(p)
    grads = []
    for sens in ("backprop", pob.Checkpointed(every=every)):
        parts = [x.clone().requires_grad_(True) for x in p["parts"]]
        y0 = tuple(parts) if p["is_tuple"] else parts[0]
        params = list(p["module"].parameters())
        try:
            ys = pob.odeint(p["func"], y0, t, rtol=p["rtol"], atol=p["atol"], method=p["method"],
                            options=dict(p["options"]), sensitivity=sens)
        except pob.SolverError:
            return
        outs = ys if p["is_tuple"] else (ys,)
        loss = sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in outs)
        grads.append(torch.autograd.grad(loss, parts + params))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


@pytest.mark.timeout(120)
@settings(PROPERTY_SETTINGS, max_examples=40)
@given(problems(valid_only=True, dtypes=(torch.float64,)),
       st.sampled_from(["interpolated", "interpolating", "backsolve",
                        pob.Interpolating(checkpointing=True), pob.Interpolated(nodes="auto")]),
       st.sampled_from(["dopri5", "tsit5"]))
def test_adjoint_gradients_converge_to_the_exact_one(p, sens, method):
    """At tight tolerances the adjoint methods' gradients match backprop's on any structure, time
    grid and direction (smooth right-hand sides; the blow-up one is left to the robustness checks)."""
    module, func = p["module"], p["func"]
    if module.kind == "blowup":
        module = func = RHS("linear", p["shapes"], p["dtype"], 0, 1.0)
    t = _t_tensor(p)
    grads = []
    for s in ("backprop", sens):
        parts = [x.clone().requires_grad_(True) for x in p["parts"]]
        y0 = tuple(parts) if p["is_tuple"] else parts[0]
        ys = pob.odeint(func, y0, t, rtol=1e-9, atol=1e-9, method=method, sensitivity=s,
                        options={"max_num_steps": 2000})
        outs = ys if p["is_tuple"] else (ys,)
        loss = sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in outs)
        g = torch.autograd.grad(loss, parts + list(module.parameters()))
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    exact, adjoint = grads
    assert float((adjoint - exact).norm() / exact.norm().clamp_min(1e-12)) < 1e-5


@pytest.mark.timeout(60)
@settings(PROPERTY_SETTINGS, max_examples=30)
@given(first_step=st.floats(-323.0, 0.0).map(lambda e: 10.0 ** e),
       t0=st.sampled_from([0.0, 1.0, -3.0, 100.0]), method=st.sampled_from(sorted(set(METHODS) - FIXED)))
@example(first_step=1e-17, t0=1.0, method="dopri5")
@example(first_step=5e-324, t0=0.0, method="dopri5")
def test_any_first_step_solves_or_raises_a_documented_error(first_step, t0, method):
    y0 = torch.ones(2, dtype=torch.float64)
    t = torch.tensor([t0, t0 + 1.0], dtype=torch.float64)
    try:
        ys = pob.odeint(lambda t, y: -y, y0, t, method=method,
                        options={"first_step": first_step, "max_num_steps": 100})
    except ValueError as e:
        assert first_step == 0.0 and "first_step" in str(e), e
        return
    except pob.SolverError as e:
        assert f"forward solve with method '{method}'" in str(e) and "t=" in str(e), e
        return
    assert bool(torch.isfinite(ys).all())
    torch.testing.assert_close(ys[-1], y0 * torch.exp(torch.tensor(-1.0, dtype=torch.float64)),
                               rtol=1e-5, atol=1e-7)
