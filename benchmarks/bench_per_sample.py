"""Per-sample solving (issue 18): our joint mode, torchode's per-sample mode and our per-sample mode
(a 2-D ``t``), side by side in one process, forward+backward.

Workloads (the issue's):
  homogeneous    MLP 2-64-2 tanh, batch 256, dopri5 rtol = atol = 1e-5, all rows on [0, 1].
  heterogeneous  dy/dt = -k_b (y - theta sin t), k_b log-spaced over 0.1-100, row b observed at 6
                 times of its own span [0, T_b], T_b in [1, 10]; joint mode solves the union of the
                 rows' times (torchdiffeq's workaround), torchode and per-sample mode each row on its
                 own times. Exact solution known: the per-row error is against it.
  cnf            FFJORD toy CNF (concatsquash 2-64-64-64-2 tanh, exact trace), batch 512, dopri5 1e-5.

Printed per workload: median forward+backward time of each mode and the ratios, the evaluations
each row was computed in (every mode evaluates every row in every call: the func's calls) beside
what each row needed on its own (torchode's per-row attempted steps x 6 + 2, dopri5 with FSAL;
ours: the accepted steps, ``SolveStats.sample_steps``), and the per-row error in units of the
tolerance, ``max_t rms(|y - y_ref| / (atol + rtol |y_ref|))``, with the rows above 1 (a
tolerance is local, so above 1 is possible for every mode; joint control additionally averages
each row's error into the batch's RMS). The reference is the
exact solution (heterogeneous) or a float64 joint solve at 1e-12 (its error is far below 1e-5
even after that averaging).

Everything runs in float64 on one thread (``torch.set_num_threads(1)``). ``--quick`` runs a
smaller batch with fewer rounds (a smoke test, not a measurement).

    python benchmarks/bench_per_sample.py [--quick] [--rounds 5] [--workloads homogeneous cnf]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge.models.cnf import CNFDynamics, ConcatSquashMLP

DTYPE = torch.float64


class Counted(nn.Module):
    """``func(t, y)`` that counts its calls; ``t`` is 0-d (joint) or ``(B,)`` (per-sample)."""

    def __init__(self, field):
        super().__init__()
        self.field, self.calls = field, 0

    def forward(self, t, y):
        self.calls += 1
        return self.field(t, y)


class MLP(nn.Module):
    """Autonomous 2-64-2 tanh MLP (ignores ``t``)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))

    def forward(self, t, y):
        return self.net(y)


class Relax(nn.Module):
    """``dy/dt = -k_b (y - theta sin t)``: row b relaxes at rate ``k_b`` towards a forcing.

    ``t`` 0-d or ``(B,)``; ``y`` ``(B, 2)``; ``theta`` ``(2,)`` is the trained parameter.
    """

    def __init__(self, k: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k[:, None])
        self.theta = nn.Parameter(torch.tensor([1.0, -0.5]))

    def forward(self, t, y):
        return -self.k * (y - self.theta * torch.sin(torch.as_tensor(t).reshape(-1, 1)))

    def exact(self, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The solution at ``t`` ``(B, T)`` from ``y0`` ``(B, 2)`` at 0 -> ``(B, T, 2)``."""
        k, a = self.k[:, :, None], self.theta.detach()
        t = t[:, :, None]
        forced = a * k * (k * torch.sin(t) - torch.cos(t)) / (k * k + 1)
        return (y0[:, None, :] + a * k / (k * k + 1)) * torch.exp(-k * t) + forced


class FlatCNF(nn.Module):
    """The CNF dynamics on a flat state ``(B, D + 1)`` = ``[z, logp]`` (torchode takes one tensor)."""

    def __init__(self, dynamics: CNFDynamics):
        super().__init__()
        self.dynamics = dynamics

    def forward(self, t, y):
        dz, dlogp = self.dynamics(t, (y[:, :-1], y[:, -1]))
        return torch.cat([dz, dlogp[:, None]], dim=1)


# --- the modes -----------------------------------------------------------------------------------


def joint(func, y0, t2d, tol):
    """Our joint mode on the union of the rows' times; returns row b's outputs ``(B, T, F)``."""
    t_union = torch.unique(t2d)
    ys = pob.odeint(func, y0, t_union, rtol=tol, atol=tol, method="dopri5")
    idx = torch.searchsorted(t_union, t2d)
    return ys[idx, torch.arange(y0.shape[0])[:, None]], {}


def torchode_per_sample(func, y0, t2d, tol):
    """torchode 1.0.1's per-sample dopri5 with its integral controller (our PI controller's first
    steps are integral control too); returns ``(B, T, F)`` and its per-row attempted steps."""
    import torchode as to

    term = to.ODETerm(func)
    solver = to.AutoDiffAdjoint(to.Dopri5(term=term),
                                to.IntegralController(atol=tol, rtol=tol, term=term).to(DTYPE))
    sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t2d))
    if not bool((sol.status == 0).all()):
        raise RuntimeError(f"torchode failed on rows {(sol.status != 0).nonzero().flatten().tolist()}")
    return sol.ys, {"steps": sol.stats["n_steps"]}


def ours_per_sample(func, y0, t2d, tol):
    """Our per-sample mode: a 2-D ``t``; returns ``(B, T, F)`` and each row's accepted steps."""
    stats = pob.SolveStats()
    ys = pob.odeint(func, y0, t2d, rtol=tol, atol=tol, method="dopri5", stats=stats)
    return ys.transpose(0, 1), {"accepted": stats.sample_steps}


MODES = {"joint": joint, "torchode": torchode_per_sample, "per_sample": ours_per_sample}


# --- workloads -----------------------------------------------------------------------------------


def homogeneous(batch):
    torch.manual_seed(0)
    field = MLP().to(DTYPE)
    y0 = torch.randn(batch, 2, dtype=DTYPE)
    t2d = torch.tensor([0.0, 1.0], dtype=DTYPE).expand(batch, 2).contiguous()
    return field, y0, t2d, None


def heterogeneous(batch):
    torch.manual_seed(0)
    field = Relax(torch.logspace(-1, 2, batch, dtype=DTYPE)[torch.randperm(batch)]).to(DTYPE)
    y0 = torch.randn(batch, 2, dtype=DTYPE)
    span = 1 + 9 * torch.rand(batch, 1, dtype=DTYPE)
    t2d = torch.cat([torch.zeros(batch, 1, dtype=DTYPE),
                     span * torch.rand(batch, 5, dtype=DTYPE).sort(dim=1).values], dim=1)
    return field, y0, t2d, field.exact(y0, t2d)


def cnf(batch):
    torch.manual_seed(0)
    field = FlatCNF(CNFDynamics(ConcatSquashMLP(2, (64, 64, 64)), divergence="exact")).to(DTYPE)
    y0 = torch.cat([torch.randn(batch, 2, dtype=DTYPE), torch.zeros(batch, 1, dtype=DTYPE)], dim=1)
    t2d = torch.tensor([0.0, 1.0], dtype=DTYPE).expand(batch, 2).contiguous()
    return field, y0, t2d, None


WORKLOADS = {"homogeneous": (homogeneous, 256), "heterogeneous": (heterogeneous, 256), "cnf": (cnf, 512)}


def row_error(ys, ref, tol):
    """``(B,)``: the largest over the row's outputs of the RMS over features of the error in units
    of the tolerance."""
    scaled = (ys.detach() - ref) / (tol + tol * ref.abs())
    return scaled.pow(2).mean(-1).sqrt().amax(-1)


def run(name, batch, rounds, tol=1e-5):
    make, _ = WORKLOADS[name]
    field, y0, t2d, ref = make(batch)
    func = Counted(field)
    if ref is None:
        with torch.no_grad():
            ref, _ = joint(field, y0, t2d, 1e-12)
    print(f"\n== {name}: batch {batch}, dopri5 rtol = atol = {tol:g}, float64, forward+backward")
    times, rows = {}, {}
    for mode, solve in MODES.items():
        solve(func, y0, t2d, tol)  # warm-up
        func.calls = 0
        ys, extra = solve(func, y0, t2d, tol)
        ys.sum().backward()
        err = row_error(ys, ref, tol)
        rows[mode] = (func.calls, extra, err)
        times[mode] = []
    for _ in range(rounds):  # interleaved, so drifting machine load hits every mode alike
        for mode in times:
            func.zero_grad(set_to_none=True)
            start = time.perf_counter()
            ys, _ = MODES[mode](func, y0, t2d, tol)
            ys.sum().backward()
            times[mode].append(time.perf_counter() - start)
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    for mode in times:
        calls, extra, err = rows[mode]
        miss = (err > 1).nonzero().flatten().tolist()
        line = (f"  {mode:10s} {med[mode] * 1e3:9.1f} ms  x{med[mode] / med['joint']:5.2f} joint, "
                f"x{med[mode] / med['torchode']:5.2f} torchode | evals per row (forward) {calls:6d} | "
                f"error/tol median {err.median():.3g} "
                f"max {err.max():.3g}, rows > 1: {len(miss)}")
        print(line + (f" {miss[:12]}{' ...' if len(miss) > 12 else ''}" if miss else ""))
        if "accepted" in extra:
            acc = extra["accepted"]
            print(f"  {'':10s} accepted steps per row {int(acc.min())}-{int(acc.max())}, median "
                  f"{int(acc.median())}: each row stops at its own end, but its field is evaluated in "
                  "every call (no compaction)")
        if "steps" in extra:
            need = 6 * extra["steps"] + 2
            print(f"  {'':10s} each row on its own needs (forward) {int(need.min())}-{int(need.max())} evals, "
                  f"median {int(need.median())}, mean {need.double().mean():.0f}; joint/torchode "
                  "evaluate every row in every call")
    if name == "heterogeneous":
        k = func.field.k[:, 0]
        for mode, (_, _, err) in rows.items():
            worst = err.argsort(descending=True)[:5].tolist()
            print(f"  {mode}'s worst rows (row, k, error/tol): "
                  + ", ".join(f"({b}, {float(k[b]):.3g}, {float(err[b]):.3g})" for b in worst))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="batch 32, one round (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.workloads:
        batch = 32 if args.quick else WORKLOADS[name][1]
        run(name, batch, 1 if args.quick else args.rounds)


if __name__ == "__main__":
    main()
