"""Faults inside a solve, for every gradient method: NaN mid-solve, finite-time blow-up, NaN or an
exception in the backward pass, and Python errors raised by ``func``.

Each fault must surface as an error that says where it happened (the time, the method, the forward
solve or the backward pass) - ``pob.SolverError`` for a failed solve, the user's own exception type
for an exception ``func`` raises - and must leave the model alone: parameter values unchanged and
no partial gradient accumulation (a ``.grad`` that was ``None`` stays ``None``, one that held a value
keeps it, and so does ``y0.grad``).

Several tests pin library bugs these checks found (dense-output overflow inside a fixed step,
unchecked parameter gradients, checkpointed passing NaN gradients on, errors without a place).
``backprop`` is plain autograd through ``func``: what autograd does with a
NaN or an exception in ``func``'s own derivative is PyTorch's behaviour, not the solver's, so the
tests of the solver's backward code exempt it where noted.
"""
from __future__ import annotations

import contextlib
import re
import time

import pytest
import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge._state import FlatRHS, StateSpec

torch.set_num_threads(1)

SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve",
                 pob.Interpolating(checkpointing=True, every=2)]
ADJOINTS = [s for s in SENSITIVITIES if s not in ("backprop", "checkpointed")]
METHODS = ["dopri5", "rk4"]
T = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
STEP = {"rk4": {"step_size": 0.05}, "dopri5": None}


def sid(s):
    if isinstance(s, str):
        return s
    return "interpolating-ckpt" if isinstance(s, pob.Interpolating) else type(s).__name__


def context_of(sens):
    """The direction string an error of ``sens``'s backward pass must contain."""
    name = sens if isinstance(sens, str) else sens.name
    return f"backward pass ({name}"


class Boom(Exception):
    """A user's own exception type (must come out of odeint as itself)."""


class RaiseInBackward(torch.autograd.Function):
    """Identity whose derivative raises: a fault inside ``func``'s own backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise Boom("derivative of func failed")


class NaNDerivative(torch.autograd.Function):
    """Identity whose derivative is NaN (e.g. sqrt at 0 times 0 in a real model)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Func(nn.Module):
    """A well-behaved time-dependent tanh layer with switchable faults.

    ``fault``: ``None``; ``"nan_after"``: returns NaN for ``t > t_fault``; ``"raise_after"``: raises
    :class:`Boom` for ``t > t_fault``; ``"raise_bwd"``/``"nan_bwd"``: its derivative raises / is NaN;
    ``"nan_when_reevaluated"``/``"raise_when_reevaluated"``: a NaN / an exception only once
    ``armed`` (set after the forward, so only the backward pass's own evaluations of ``func`` see
    it).
    """

    def __init__(self, fault=None, t_fault=0.5):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3).double()
        self.gate = nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
        self.fault, self.t_fault, self.armed = fault, t_fault, False

    def forward(self, t, y):
        if self.fault == "raise_bwd":
            y = RaiseInBackward.apply(y)
        elif self.fault == "nan_bwd":
            y = NaNDerivative.apply(y)
        out = -torch.tanh(self.lin(y)) + t * self.gate
        if self.fault == "nan_after" and float(t) > self.t_fault:
            return out * float("nan")
        if self.fault == "raise_after" and float(t) > self.t_fault:
            raise Boom(f"func failed at t={float(t)}")
        if self.armed and self.fault == "nan_when_reevaluated":
            return out * float("nan")
        if self.armed and self.fault == "raise_when_reevaluated":
            raise Boom("func failed when re-evaluated")
        return out


class Snapshot:
    """Parameter values and ``.grad`` of the model (and ``y0``) before a failing call."""

    def __init__(self, func, y0, seed_grads):
        if seed_grads:  # a previous iteration's gradients that a failure must not touch
            for p in func.parameters():
                p.grad = torch.full_like(p, 0.25)
            y0.grad = torch.full_like(y0, -0.5)
        self.func, self.y0 = func, y0
        self.values = [p.detach().clone() for p in func.parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in func.parameters()]
        self.y0_grad = None if y0.grad is None else y0.grad.clone()

    def assert_untouched(self):
        for p, v, g in zip(self.func.parameters(), self.values, self.grads):
            torch.testing.assert_close(p.detach(), v, rtol=0, atol=0)
            if g is None:
                assert p.grad is None, "a failed call accumulated a partial gradient"
            else:
                torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        if self.y0_grad is None:
            assert self.y0.grad is None, "a failed call accumulated a partial gradient into y0"
        else:
            torch.testing.assert_close(self.y0.grad, self.y0_grad, rtol=0, atol=0)


def _y0():
    return torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)


def _loss(ys):
    return (ys[1] ** 2).sum() + ys[-1].sum()


def _times_in(msg):
    return [float(x) for x in re.findall(r"t=(-?[0-9.]+(?:e[-+]?[0-9]+)?)", msg)]


# --- forward faults -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed_grads", [False, True], ids=["no-grad-yet", "grad-held"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=sid)
def test_nan_mid_solve_says_where_and_leaves_model_alone(sens, method, seed_grads):
    func, y0 = Func("nan_after", t_fault=0.5), _y0()
    snap = Snapshot(func, y0, seed_grads)
    with pytest.raises(pob.SolverError, match=rf"forward solve with method '{method}'.*NaN/Inf") as info:
        pob.odeint(func, y0, T, method=method, options=STEP[method], sensitivity=sens)
    ts = _times_in(str(info.value))
    # The first NaN evaluation is at some t in (0.5, 0.5 + one step]; the message names that step.
    assert ts and 0.3 <= ts[0] <= 0.75, str(info.value)
    snap.assert_untouched()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=sid)
def test_finite_time_blow_up_says_where_and_leaves_model_alone(sens, method):
    """``dy/dt = k y^2`` from ``y = 1`` blows up at ``t = 1/k``: a clear error near it, never a hang."""

    class BlowUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, t, y):
            return self.k * y * y

    func = BlowUp()
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    snap = Snapshot(func, y0, seed_grads=True)
    start = time.perf_counter()
    with pytest.raises(pob.SolverError, match=rf"forward solve with method '{method}'.*"
                                              r"(underflow|NaN/Inf|max_num_steps)") as info:
        pob.odeint(func, y0, torch.tensor([0.0, 0.5, 3.0], dtype=torch.float64), method=method,
                   options=STEP[method], sensitivity=sens)
    assert time.perf_counter() - start < 20
    ts = _times_in(str(info.value))
    assert ts and 0.9 <= ts[0] <= 1.5, str(info.value)  # at (or one fixed step past) t = 1/k
    snap.assert_untouched()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,k,t", [("rk4", 20.0, [0.0, 1.0, 2.0]), ("dopri5", 5.0, [0.0, 0.5, 1.0])])
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=sid)
def test_overflow_inside_a_fixed_step_is_an_error_not_a_silent_inf(sens, method, k, t):
    """One fixed step covers all outputs: its end state is finite (~1e19-1e22) but the dense output
    at the interior time overflows float32 - odeint must not return that Inf.

    Minimal reproduction: ``odeint(lambda t, y: 20 * y * y, torch.ones(1), torch.tensor([0., 1.,
    2.]), method="rk4", options={"step_size": 2.0})`` returns ``[1, -inf, 3.6e19]``."""
    y0 = torch.ones(1, requires_grad=True)
    t = torch.tensor(t)
    try:
        ys = pob.odeint(lambda tt, y: k * y * y, y0, t, method=method,
                        options={"step_size": float(t[-1])}, sensitivity=sens)
    except pob.SolverError as e:
        msg = str(e)
        assert f"forward solve with method '{method}'" in msg and "NaN/Inf" in msg, msg
        assert float(t[1]) in _times_in(msg), msg  # names the output time that overflowed
        return
    pytest.fail(f"odeint returned {ys.detach().flatten().tolist()} without an error")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=sid)
def test_python_error_in_func_propagates_with_its_type(sens, method):
    func, y0 = Func("raise_after", t_fault=0.5), _y0()
    snap = Snapshot(func, y0, seed_grads=True)
    with pytest.raises(Boom, match="func failed at t=") as info:
        pob.odeint(func, y0, T, method=method, options=STEP[method], sensitivity=sens)
    assert type(info.value) is Boom  # not wrapped in (or replaced by) a SolverError
    snap.assert_untouched()
    # The same model solves again afterwards (no state left behind by the failure).
    func.fault = None
    ys = pob.odeint(func, y0, T, method=method, options=STEP[method], sensitivity=sens)
    assert bool(torch.isfinite(ys).all())


# --- backward faults ------------------------------------------------------------------------------


def _backward_fails(func, y0, sens, method, exc, seed_grads=True, arm=False, match=None):
    snap = Snapshot(func, y0, seed_grads)
    ys = pob.odeint(func, y0, T, method=method, options=STEP[method], sensitivity=sens)
    assert bool(torch.isfinite(ys).all())
    func.armed = arm
    with pytest.raises(exc, match=match) as info:
        _loss(ys).backward()
    snap.assert_untouched()
    return info.value


def _notes(e):
    return " | ".join([str(e)] + list(getattr(e, "__notes__", [])))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed_grads", [False, True], ids=["no-grad-yet", "grad-held"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=sid)
def test_exception_in_funcs_derivative_propagates_and_leaves_model_alone(sens, method, seed_grads):
    e = _backward_fails(Func("raise_bwd"), _y0(), sens, method, Boom, seed_grads,
                        match="derivative of func failed")
    assert type(e) is Boom


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", SENSITIVITIES, ids=sid)
def test_exception_when_func_is_reevaluated_in_backward_propagates(sens, method):
    """Methods that call func again in the backward (all but ``backprop``) pass its exception on
    unchanged and accumulate nothing; ``backprop`` never calls it again, so it just succeeds."""
    func, y0 = Func("raise_when_reevaluated"), _y0()
    if sens == "backprop":
        ys = pob.odeint(func, y0, T, method=method, options=STEP[method], sensitivity=sens)
        func.armed = True
        _loss(ys).backward()
        assert bool(torch.isfinite(y0.grad).all())
        return
    e = _backward_fails(func, y0, sens, method, Boom, arm=True, match="func failed when re-evaluated")
    assert type(e) is Boom




@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", [s for s in SENSITIVITIES
                                  if s != "backprop"], ids=sid)
def test_exception_in_backward_says_where(sens, method):
    """The solver's backward code (not autograd's, as in ``backprop``) annotates the exception."""
    for fault, arm in (("raise_bwd", False), ("raise_when_reevaluated", True)):
        e = _backward_fails(Func(fault), _y0(), sens, method, Boom, arm=arm)
        text = _notes(e)
        assert context_of(sens) in text and f"method '{method}'" in text and _times_in(text), text


def test_a_pass_names_itself_in_funcs_errors_and_gives_the_name_back():
    """``solving`` names the pass in func's errors inside its ``with`` block only; the previous name
    comes back on exit, also when func's exception passes through (a failed backward must not
    leave a reused right-hand side naming the backward in later errors)."""
    y0 = _y0().detach()
    rhs = FlatRHS(Func("raise_after"), StateSpec(y0), torch.float64, "rk4")
    with rhs.solving("backward pass (outer)"):
        with pytest.raises(Boom) as info, rhs.solving("backward pass (mine)"):
            rhs(0.75, y0)
        assert "in the backward pass (mine) with method 'rk4'" in _notes(info.value)
        assert rhs.context == "backward pass (outer)"
    with pytest.raises(Boom) as info:
        rhs(0.75, y0)
    assert "in the forward solve with method 'rk4'" in _notes(info.value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", [s for s in SENSITIVITIES if s != "checkpointed"] + [
    "checkpointed"], ids=sid)
def test_nan_when_func_is_reevaluated_in_backward(sens, method):
    """A func that turns NaN after the forward: methods that re-evaluate it in the backward must
    raise a SolverError naming the backward pass; ``backprop`` never re-evaluates it."""
    func, y0 = Func("nan_when_reevaluated"), _y0()
    if sens == "backprop":
        ys = pob.odeint(func, y0, T, method=method, options=STEP[method], sensitivity=sens)
        func.armed = True
        _loss(ys).backward()
        assert bool(torch.isfinite(y0.grad).all())
        return
    e = _backward_fails(func, y0, sens, method, pob.SolverError, arm=True)
    msg = str(e)
    assert context_of(sens) in msg and f"method '{method}'" in msg and "NaN/Inf" in msg, msg
    assert _times_in(msg), msg




@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", [s for s in SENSITIVITIES if s not in ("backprop", "checkpointed")]
                         + ["checkpointed"], ids=sid)
def test_nan_derivative_of_func_raises_in_backward(sens, method):
    """``backprop`` is exempt: a NaN in func's own derivative is autograd's to report
    (``torch.autograd.set_detect_anomaly``); the solver's backward code must not pass it on."""
    e = _backward_fails(Func("nan_bwd"), _y0(), sens, method, pob.SolverError)
    msg = str(e)
    assert context_of(sens) in msg and f"method '{method}'" in msg and _times_in(msg), msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sens", [s for s in SENSITIVITIES if s != "backprop"],
    ids=sid)
def test_parameter_gradient_overflow_raises(sens, method):
    """float32: the state (1e15) and the adjoint (1e25) are finite, the parameter gradient
    (their product, ~1e40) is not. ``backprop`` is exempt (autograd returns the Inf)."""

    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.5))

        def forward(self, t, y):
            return -self.k * y

    func = Decay()
    y0 = torch.full((2,), 1e15, requires_grad=True)
    snap = Snapshot(func, y0, seed_grads=True)
    ys = pob.odeint(func, y0, T.float(), method=method, options=STEP[method], sensitivity=sens)
    with pytest.raises(pob.SolverError, match=r"backward pass.*NaN/Inf"):
        (1e25 * ys[-1]).sum().backward()
    snap.assert_untouched()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_backsolve_guard_error_says_where(method):
    """Stiff decay: the reverse solve of z grows like exp(lam t) and misses the forward state
    (measured: the gradient 26% off with dopri5 and 4.5% with rk4 at lam = 25 on [0, 2]; at
    lam = 30 on [0, 1] dopri5's is within 0.002%, and the guard stays quiet)."""
    lam = 25.0
    A = nn.Parameter(torch.tensor([[-lam, 0.0], [0.0, -1.0]], dtype=torch.float64))
    func = lambda t, y: y @ A.T
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ys = pob.odeint(func, y0, t, rtol=1e-6, atol=1e-9, method=method, options=STEP[method],
                    sensitivity=pob.Backsolve(on_instability="raise"))
    with pytest.raises(pob.SolverError) as info:
        ys[-1].sum().backward()
    msg = str(info.value)
    assert A.grad is None and y0.grad is None
    assert f"backward pass (backsolve) with method '{method}'" in msg and _times_in(msg), msg


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sens", [s for s in SENSITIVITIES if s != "backprop"], ids=sid)
def test_gradient_methods_deliver_gradients_all_at_once(sens):
    """A parameter used only late in the solve, and a derivative that raises early: the solver's own
    backward returns every gradient together, so nothing reaches ``.grad`` when it fails.

    (``backprop`` is autograd's engine: it accumulates ``late.grad`` as soon as every use of
    ``late`` has been back-propagated - before it reaches the failing early step. That is PyTorch's
    semantics for any model; use a memory-lean method where an all-or-nothing gradient matters.)"""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
            self.late = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, t, y):
            if float(t) < 0.3:
                y = RaiseInBackward.apply(y)
            out = self.a * y
            return out + self.late * y if float(t) > 0.5 else out

    func = Gated()
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    snap = Snapshot(func, y0, seed_grads=False)
    # The field jumps at t=0.5 inside the one output interval: interpolated's guard must say so.
    expected = pytest.warns(pob.AccuracyWarning) if sens == "interpolated" else contextlib.nullcontext()
    with expected:
        ys = pob.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                        options={"step_size": 0.1}, sensitivity=sens)
    with pytest.raises(Boom):
        ys[-1].sum().backward()
    snap.assert_untouched()
