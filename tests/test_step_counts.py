"""Evaluations at equal rtol/atol against torchdiffeq (issue 16, item 11).

torchdiffeq's adaptive_heun and fehlberg2 start each step from the previous step's last stage
(``ButcherTableau.carry_last``): 1 and 2 evaluations per step where a fresh first stage costs 2 and
3. And the PI controller aims at the error ratio ``safety**k``, where torchdiffeq's integral
controller settles, instead of Hairer's lower fixed point (10-15% more steps at equal tolerance).
benchmarks/work_precision.py measures the whole table; these are its decisive ratios.
"""
import pytest
import torch

import pyode_bridge as pob
from pyode_bridge import torchdiffeq as shim
from pyode_bridge.solvers import PIController

torchdiffeq = pytest.importorskip("torchdiffeq")


def _van_der_pol(t, y):  # DETEST E2
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


class _Counted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return _van_der_pol(t, y)


def _solve(odeint, method, t_end, tol):
    f = _Counted()
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, t_end], dtype=torch.float64)
    return odeint(f, y0, t, method=method, rtol=tol, atol=tol)[-1], f.calls


@pytest.mark.parametrize("method", ["adaptive_heun", "fehlberg2", "bosh3"])
def test_evaluations_at_equal_tolerance_match_torchdiffeq(method):
    ref, _ = _solve(shim.odeint, "dopri8", 6.0, 1e-12)
    y_td, n_td = _solve(torchdiffeq.odeint, method, 6.0, 1e-5)
    y, n = _solve(shim.odeint, method, 6.0, 1e-5)
    err_td, err = (y_td - ref).abs().max(), (y - ref).abs().max()
    # Before: adaptive_heun 2.2x and fehlberg2 1.5x torchdiffeq's evaluations, at about its error.
    assert n <= 1.1 * n_td, (n, n_td)
    assert err <= 2 * err_td, (err, err_td)


def test_adaptive_heun_at_rtol_1e8_finishes_under_the_default_cap():
    """torchdiffeq needs ~9,400 steps here; 6% more steps (before) crossed pyode_bridge.odeint's
    default max_num_steps of 10,000."""
    _, n_td = _solve(torchdiffeq.odeint, "adaptive_heun", 1.62, 1e-8)
    stats = pob.SolveStats()
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    pob.odeint(_van_der_pol, y0, torch.tensor([0.0, 1.62], dtype=torch.float64), method="adaptive_heun",
               rtol=1e-8, atol=1e-8, stats=stats)
    assert stats.nfe_forward <= 1.03 * n_td, (stats.nfe_forward, n_td)


def test_pi_controller_settles_where_the_integral_controller_does():
    """At a constant error ratio ``r`` the PI step factor is 1 exactly at ``r = safety**k``, the
    ratio at which the integral control of the first step keeps the step too."""
    for k in (2, 3, 5, 8):
        c = PIController(k)
        r = 0.9 ** k
        assert c.propose(1.0, r, accepted=True) == pytest.approx(1.0)  # integral (first step)
        assert c.propose(1.0, r, accepted=True) == pytest.approx(1.0)  # PI, r_prev = r
        assert c.propose(1.0, r * 1.1, accepted=True) < 1.0


@pytest.mark.parametrize("method", ["adaptive_heun", "fehlberg2", "bosh3"])
def test_memory_prediction_counts_the_evaluations_backprop_keeps(method):
    """A carried last stage is one evaluation fewer per step in backprop's graph too."""
    from pyode_bridge.memory import predict_backward_bytes

    stats = pob.SolveStats()
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    pob.odeint(_van_der_pol, y0, torch.tensor([0.0, 2.0], dtype=torch.float64), method=method, rtol=1e-4,
               atol=1e-4, stats=stats)
    pred = predict_backward_bytes("backprop", state_bytes=1, steps=stats.steps_forward, eval_saved_bytes=1,
                                  method=method)
    # The solve: f(t0, y0), the initial-step probe, then the same evaluations per attempted step;
    # backprop keeps f(t0, y0) and those of the accepted steps.
    per_step = (stats.nfe_forward - 2) / (stats.steps_forward + stats.steps_rejected)
    assert pred.kept_bytes == 1 + stats.steps_forward * per_step
