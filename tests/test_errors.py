"""Every bad input or failed solve gives a clear error that names the problem (never a hang)."""
import math
import time

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
    (torch.zeros(2, 2), "1-D"),
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
    with pytest.raises(ValueError, match="t is on meta but y0 is on cpu"):
        pob.odeint(f, Y0, meta_t)
    net = torch.nn.Linear(3, 3).to("meta")
    with pytest.raises(ValueError, match="is on meta but y0 is on cpu"):
        pob.odeint(lambda t, y: net(y), Y0, T)


def test_unknown_method_option_sensitivity_backend():
    with pytest.raises(ValueError, match="valid methods.*dopri5"):
        pob.odeint(f, Y0, T, method="dopri8")
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


def test_bad_grid_option():
    with pytest.raises(ValueError, match="grid.*must start"):
        pob.odeint(f, Y0, T, method="rk4", options={"grid": [0.0, 0.5]})
    with pytest.raises(ValueError, match="step_size"):
        pob.odeint(f, Y0, T, method="rk4", options={"step_size": -0.1})
