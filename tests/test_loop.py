"""The stepping loop's parts: step control (adaptive, fixed grid) and integrate's first_stage."""
from __future__ import annotations

import gc
import math
import weakref
from types import SimpleNamespace

import pytest
import torch

from pyode_bridge.errors import SolverError
from pyode_bridge.solvers import TABLEAUX, ControlOptions, PIController, SolverConfig, TimeOptions, integrate
from pyode_bridge.solvers.boundaries import StepCallbacks
from pyode_bridge.solvers.controller import AdaptiveControl, GridControl
from pyode_bridge.solvers.loop import Replay

F64 = torch.float64


def _counting_rhs():
    calls = [0]

    def rhs(t, y):
        calls[0] += 1
        return torch.stack([y[1], -y[0] * (1.0 + 0.5 * math.sin(3 * t))])

    return rhs, calls


def _control(h, stops=(), min_step=0.0, max_num_steps=100):
    pi = PIController(5, max_step=math.inf)
    return AdaptiveControl(pi, h, 0.0, 1.0, list(stops), min_step, max_num_steps, StepCallbacks(),
                           "forward solve", TABLEAUX["dopri5"])


def _step(t1):
    return SimpleNamespace(t1=t1, y0=torch.zeros(2), k0=torch.zeros(2))


def test_adaptive_control_lands_on_stops_and_judges():
    ctl = _control(0.496, stops=[0.5])
    t0, t1 = ctl.propose()
    assert (t0, t1) == (0.0, 0.5)  # short of the stop by under 1%: stretched onto it
    assert not ctl.judge(2.0, _step(t1))  # rejected: nothing moves, the step shrinks
    assert (ctl.t, ctl.steps, ctl.rejected, ctl.step_times) == (0.0, 0, 1, [0.0])
    t0, t1 = ctl.propose()
    assert t0 == 0.0 and 0.0 < t1 < 0.5
    assert ctl.judge(0.5, _step(t1)) and ctl.t == t1 and ctl.step_times == [0.0, t1]
    while not ctl.done:
        t0, t1 = ctl.propose()
        ctl.judge(0.5, _step(t1))
    assert ctl.step_times[-1] == 1.0 and 0.5 in ctl.step_times and ctl.steps == len(ctl.step_times) - 1


def test_adaptive_control_accepts_min_step_and_counts_attempts():
    ctl = _control(0.01, min_step=0.02, max_num_steps=3)
    t0, t1 = ctl.propose()
    assert t1 == 0.02  # raised to min_step, and accepted whatever its finite error
    assert ctl.judge(50.0, _step(t1))
    t0, t1 = ctl.propose()
    with pytest.raises(SolverError, match="underflow at t=0.02 .*NaN/Inf"):
        ctl.judge(math.inf, _step(t1))  # only a non-finite error rejects a min_step step: stuck
    # From t=0.6, t + 0.5 - t rounds to one ulp above 0.5: still a min_step step, accepted (it
    # was rejected at that size forever, ending at max_num_steps).
    pi = PIController(5, max_step=math.inf)
    ctl = AdaptiveControl(pi, 0.01, 0.6, 3.0, [], 0.5, 3, StepCallbacks(), "forward solve", TABLEAUX["dopri5"])
    t0, t1 = ctl.propose()
    assert t1 - t0 > 0.5 and ctl.judge(50.0, _step(t1)) and ctl.t == t1
    ctl = _control(0.1, max_num_steps=3)
    for _ in range(3):
        ctl.propose()
        ctl.judge(2.0, None)
    with pytest.raises(SolverError, match=r"max_num_steps=3 at t=0 before t=1 \(0 accepted, 3 rejected"):
        ctl.propose()


def test_grid_control_walks_the_grid():
    grid = [0.0, 0.25, 0.6, 1.0]
    ctl = GridControl(grid, 10, "forward solve", TABLEAUX["rk4"])
    ends = []
    while not ctl.done:
        t0, t1 = ctl.propose()
        assert ctl.judge(None, _step(t1))
        ends.append((t0, t1))
    assert ends == list(zip(grid, grid[1:])) and ctl.step_times == grid and ctl.next_step is None


@pytest.mark.parametrize("method, step_size", [("dopri5", None), ("tsit5", None), ("adaptive_heun", None),
                                               ("rk4", 0.1), ("midpoint", 0.05)])
def test_first_stage_replaces_the_first_evaluation(method, step_size):
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t_eval = [0.0, 0.4, 1.3]
    cfg = SolverConfig(TABLEAUX[method], ControlOptions(rtol=1e-7, atol=1e-9), TimeOptions(step_size=step_size))
    rhs, calls = _counting_rhs()
    ref = integrate(rhs, y0, t_eval, cfg)
    nfe_ref = calls[0]
    f0 = rhs(0.0, y0)
    calls[0] = 0
    res = integrate(rhs, y0, t_eval, cfg, first_stage=f0)
    assert torch.equal(res.stacked(), ref.stacked())
    assert res.step_times == ref.step_times and calls[0] == nfe_ref - 1


def test_first_stage_replays_a_carried_step_bit_for_bit():
    """A step of a carry_last tableau starts from the last stage of the step before, not from
    f(t0, y0); integrate(first_stage=...) replays it exactly, a fresh evaluation does not."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    cfg = SolverConfig(TABLEAUX["adaptive_heun"], ControlOptions(rtol=1e-6, atol=1e-8))
    rhs, _ = _counting_rhs()
    steps = []
    integrate(rhs, y0, [0.0, 2.0], cfg, on_step=steps.append)
    s = steps[3]
    assert not torch.equal(s.k0, rhs(s.t0, s.y0))  # the carried stage is not f(t0, y0)
    replay = cfg.replay([s.t0, s.t1])
    carried = integrate(rhs, s.y0, [s.t0, s.t1], replay, first_stage=s.k0).ys[-1]
    fresh = integrate(rhs, s.y0, [s.t0, s.t1], replay).ys[-1]
    assert torch.equal(carried, s.y1) and not torch.equal(fresh, s.y1)


@pytest.mark.parametrize("method", ["dopri5", "adaptive_heun", "bosh3"])
def test_replay_grid_equals_a_replay_config_per_segment(method):
    """integrate(grid=...) on one replay configuration of the whole recorded solve steps exactly
    as a replay configuration made for the segment: same states, outputs, carried stage, NFE."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    cfg = SolverConfig(TABLEAUX[method], ControlOptions(rtol=1e-6, atol=1e-8))
    rhs, calls = _counting_rhs()
    times = integrate(rhs, y0, [0.0, 2.0], cfg).step_times
    replay = cfg.replay(times, exact=True)
    seg = times[3:6]
    t_eval = [seg[0], 0.5 * (seg[0] + seg[1]), seg[1], seg[2]]  # an output inside a step, one on a boundary
    calls[0] = 0
    ref = integrate(rhs, y0, t_eval, cfg.replay(seg, exact=True))
    nfe_ref, calls[0] = calls[0], 0
    res = integrate(rhs, y0, t_eval, replay, grid=seg)
    assert calls[0] == nfe_ref and res.step_times == ref.step_times == seg
    assert torch.equal(res.stacked(), ref.stacked())
    assert (res.carried is None) == (ref.carried is None) == TABLEAUX[method].fsal  # lean FSAL: none
    assert ref.carried is None or torch.equal(res.carried, ref.carried)


@pytest.mark.parametrize("method, time", [
    ("dopri5", TimeOptions()), ("adaptive_heun", TimeOptions(jump_t=(0.55,))), ("bosh3", TimeOptions(perturb=True)),
    ("rk4", TimeOptions(step_size=0.15, jump_t=(0.55,))), ("dopri5", TimeOptions(step_size=0.2))])
def test_one_replay_restarted_per_segment_repeats_the_recorded_solve(method, time):
    """One Replay, restarted for each segment of two recorded steps, the last first (checkpointed's
    backward), repeats the recorded solve bit for bit: from a segment's recorded start state (and
    carried first stage) it reaches the next one's recorded start and gives the recorded outputs
    inside it (dense output, FSAL stages left out where nothing reads them, jump_t/perturb moves)."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    cfg = SolverConfig(TABLEAUX[method], ControlOptions(rtol=1e-6, atol=1e-8), time)
    rhs, _ = _counting_rhs()
    t_eval = [0.1 * k for k in range(16)]
    steps = []
    with torch.no_grad():
        rec = integrate(rhs, y0, t_eval, cfg, on_step=steps.append)
    recorded = {s.t1: s.y1 for s in steps} | dict(zip(t_eval, rec.ys))
    times = rec.step_times
    assert len(times) > 6
    replay = Replay(rhs, cfg.replay(times, exact=True), times[0], times[-1], "backward pass (checkpointed)")
    for i in reversed(range(0, len(times) - 1, 2)):
        grid = times[i:i + 3]
        seg_eval = [grid[0]] + [t for t in t_eval if grid[0] < t < grid[-1]] + [grid[-1]]
        first = steps[i].k0 if TABLEAUX[method].carry_last and i > 0 else None
        with torch.no_grad():
            res = replay.segment(rhs, steps[i].y0, seg_eval, grid, first)
        assert res.step_times == grid and res.steps == len(grid) - 1
        for t, y in zip(seg_eval[1:], res.ys[1:]):
            assert torch.equal(y, recorded[t]), (i, t)


def test_an_exact_replay_runs_no_finite_checks():
    """An exact replay (checkpointed's) repeats a solve whose NaN/Inf checks already ran on the same
    numbers: it checks nothing; a plain replay, or one with on_step, still raises."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64)

    def nan_rhs(t, y):
        return torch.full_like(y, math.nan)

    cfg = SolverConfig(TABLEAUX["rk4"], time=TimeOptions(step_size=0.1))
    res = integrate(nan_rhs, y0, [0.0, 0.2], cfg.replay([0.0, 0.1, 0.2], exact=True))
    assert torch.isnan(res.ys[-1]).all()
    for replay, on_step in ((cfg.replay([0.0, 0.1, 0.2]), None), (cfg.replay([0.0, 0.1, 0.2], exact=True), print)):
        with pytest.raises(SolverError, match="became NaN/Inf"):
            integrate(nan_rhs, y0, [0.0, 0.2], replay, on_step=on_step)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_a_solve_leaves_no_reference_cycle(method, exact):
    """The states and stages of a finished solve are freed when its result is, not at the next
    garbage collection (a checkpointed replay's graph would otherwise outlive its segment); also
    an exact replay's, whose stepper and Replay refer to each other."""
    cfg = SolverConfig(TABLEAUX[method], ControlOptions(rtol=1e-6, atol=1e-8), TimeOptions(step_size=0.1)
                       if method == "rk4" else TimeOptions())
    rhs, _ = _counting_rhs()
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    if exact:
        cfg = cfg.replay(integrate(rhs, y0, [0.0, 1.0], cfg).step_times, exact=True)
    gc.collect()
    gc.disable()
    try:
        res = integrate(rhs, y0, [0.0, 0.55, 1.0], cfg)
        end = weakref.ref(res.blocks[-1])
        del res
        assert end() is None
    finally:
        gc.enable()


def test_off_cpu_checks_agree_with_the_per_step_checks():
    """check_finite_every_step=False (the default off the CPU: one host sync at the end) gives the
    same solution, and still names a NaN quadrature, as a whole-solve failure."""
    y0, q0 = torch.tensor([1.0, 0.0], dtype=F64), torch.zeros(1, dtype=F64)

    def rhs(t, y):
        return torch.stack([y[1], -y[0]]), y[:1] ** 2

    for cfg in (SolverConfig(TABLEAUX["dopri5"], ControlOptions(rtol=1e-7, atol=1e-9)),
                SolverConfig(TABLEAUX["rk4"], time=TimeOptions(step_size=0.1))):
        a = integrate(rhs, y0, [0.0, 0.35, 1.0], cfg, q0=q0)
        b = integrate(rhs, y0, [0.0, 0.35, 1.0], cfg, q0=q0, check_finite_every_step=False)
        assert torch.equal(a.stacked(), b.stacked()) and torch.equal(a.q_end, b.q_end)

    def nan_q(t, y):
        return -y, torch.full((1,), math.nan if t > 0.5 else 0.0, dtype=F64)

    cfg = SolverConfig(TABLEAUX["rk4"], time=TimeOptions(step_size=0.1))
    with pytest.raises(SolverError, match="parameter gradient became NaN/Inf between t=0.5 and t=0.6"):
        integrate(nan_q, y0, [0.0, 1.0], cfg, q0=q0)
    with pytest.raises(SolverError, match="solution became NaN/Inf between t=0 and t=1"):
        integrate(nan_q, y0, [0.0, 1.0], cfg, q0=q0, check_finite_every_step=False)


@pytest.mark.parametrize("order,beta", [(2, None), (5, None), (5, 0.04), (8, 0.025)])
def test_per_row_step_law_is_the_scalar_one(order, beta):
    """Per-sample control steps every row with ``PIController.propose_rows``, a NumPy copy of
    ``propose`` kept for speed: both give the same next step for every history (first step or not,
    after a rejection or not, accepted or not, a zero ratio, the max_step cap), so a change of the
    law in one of them fails here."""
    import numpy as np

    cases = []
    for prev in (None, 0.3, 1e-6):
        for after_rej in (False, True):
            for accepted, ratio in ((True, 0.0), (True, 0.02), (True, 0.7), (True, 0.98), (False, 1.3), (False, 40.0)):
                for h in (0.1, -0.1, 3.0):
                    cases.append((prev, after_rej, accepted, ratio, h))
    want = []
    for prev, after_rej, accepted, ratio, h in cases:
        pi = PIController(order, beta=beta, max_step=2.5)
        pi.prev_ratio, pi.after_rejection = (None if prev is None else max(prev, 1e-4)), after_rej
        want.append(pi.propose(h, ratio, accepted))
    pi = PIController(order, beta=beta, max_step=2.5)
    col = lambda i: np.array([c[i] for c in cases])  # noqa: E731
    prev = np.array([1.0 if c[0] is None else max(c[0], 1e-4) ** pi.beta for c in cases])
    with np.errstate(all="ignore"):
        got = pi.propose_rows(col(4).astype(float), col(3).astype(float), col(2).astype(bool), prev,
                              np.array([c[0] is not None for c in cases]), col(1).astype(bool))
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
