"""Work-precision of the adaptive methods: pyode-bridge vs torchdiffeq (and torchode) at equal rtol/atol.

For every method, problem and tolerance (rtol = atol) it counts evaluations of ``func`` (NFE) and
measures the error of the solution at the final time against a tight float64 reference (pyode-bridge
dopri8 at 1e-13 / 1e-11). pyode-bridge runs through its drop-in ``pyode_bridge.torchdiffeq.odeint``,
exactly as a torchdiffeq user calls it. Two comparisons per method (issue 16, item 11):

* equal tolerance: our NFE / torchdiffeq's at the same rtol/atol (target <= 1.1, unless our error is
  at least 2x smaller);
* equal achieved error: our NFE / the NFE torchdiffeq needs for our error, interpolated log-log
  between its tolerances (target <= 1.0; only where our error lies inside torchdiffeq's range).

Problems: DETEST (Hull, Enright, Fellen & Sedgwick 1972) A2 A4 B1 B5 C1 D2 D4 E2 E3 on [0, 20] in
float64; a flow-matching sampler (a 2-D velocity MLP trained for a few seconds by conditional flow
matching on a checkerboard, 10k points, t from 0 to 1, float32, sampled through facebookresearch's
``flow_matching`` ``ODESolver`` when it is installed); the FFJORD toy CNF of workloads.py (state
``(z, logp)``, batch 100, float32). Only NFE and errors are reported, so machine load does not matter.

    python benchmarks/work_precision.py                  # every method, every problem (~10 min)
    python benchmarks/work_precision.py --methods adaptive_heun fehlberg2 --problems A2 B1 flow
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import cnf_workload  # noqa: E402

from pyode_bridge import torchdiffeq as pob_tdq  # noqa: E402

METHODS = ["dopri5", "tsit5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"]
TOLS = {"dopri5": (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8), "tsit5": (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
        "dopri8": (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9), "bosh3": (1e-3, 1e-4, 1e-5, 1e-6, 1e-7),
        "fehlberg2": (1e-3, 1e-4, 1e-5, 1e-6), "adaptive_heun": (1e-3, 1e-4, 1e-5, 1e-6)}
# torchdiffeq 0.2.5 has no tsit5: torchode is its peer there (and a third column where installed).
TORCHODE = {"dopri5": "Dopri5", "tsit5": "Tsit5"}


# ------------------------------------------------------------------------------------ problems

def _a2(t, y):
    return -0.5 * y ** 3


def _a4(t, y):
    return 0.25 * y * (1 - y / 20)


def _b1(t, y):
    return torch.stack([2 * (y[0] - y[0] * y[1]), -(y[1] - y[0] * y[1])])


def _b5(t, y):
    return torch.stack([y[1] * y[2], -y[0] * y[2], -0.51 * y[0] * y[1]])


def _c1(t, y):
    return torch.cat([-y[:1], y[:-1] - y[1:]])


def _orbit(t, y):
    r3 = (y[0] ** 2 + y[1] ** 2) ** 1.5
    return torch.stack([y[2], y[3], -y[0] / r3, -y[1] / r3])


def _e2(t, y):
    return torch.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def _e3(t, y):
    return torch.stack([y[1], y[0] ** 3 / 6 - y[0] + 2 * torch.sin(2.78535 * t)])


def _f64(*v):
    return torch.tensor(v, dtype=torch.float64)


def _orbit0(e):
    return _f64(1 - e, 0.0, 0.0, math.sqrt((1 + e) / (1 - e)))


DETEST = {"A2": (_a2, _f64(1.0)), "A4": (_a4, _f64(1.0)), "B1": (_b1, _f64(1.0, 3.0)),
          "B5": (_b5, _f64(0.0, 1.0, 1.0)), "C1": (_c1, _f64(1.0, *[0.0] * 9)), "D2": (_orbit, _orbit0(0.3)),
          "D4": (_orbit, _orbit0(0.7)), "E2": (_e2, _f64(2.0, 0.0)), "E3": (_e3, _f64(0.0, 0.0))}


class Counted(nn.Module):
    """``func(t, y)`` counting its calls (``args``: torchode's keyword)."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, t, y, args=None):
        self.calls += 1
        return self.fn(t, y)


class Velocity(nn.Module):
    """Flow-matching velocity field ``v(x, t)``: 2+1 -> 128 x3 SiLU -> 2 (flow_matching's 2-D example)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))

    def forward(self, x, t, **extras):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], 1))


def _checkerboard(n):
    x1 = torch.rand(n) * 4 - 2
    x2 = torch.rand(n) - torch.randint(high=2, size=(n,)) * 2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def train_velocity(iters=500, seed=0):
    """Conditional flow matching (linear path x_t = (1 - t) x0 + t x1) for ``iters`` Adam steps."""
    torch.manual_seed(seed)
    v = Velocity()
    opt = torch.optim.Adam(v.parameters(), 1e-3)
    for _ in range(iters):
        x1 = _checkerboard(2048)
        x0 = torch.randn_like(x1)
        t = torch.rand(2048, 1)
        loss = ((v(((1 - t) * x0 + t * x1), t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.requires_grad_(False)


class FlowProblem:
    """Sampling 10k points with the trained velocity from t = 0 to 1 (flow_matching's ODESolver)."""

    def __init__(self, n=10_000):
        self.v = train_velocity()
        torch.manual_seed(1)
        self.x0 = torch.randn(n, 2)
        self.t = torch.tensor([0.0, 1.0])

    def solve(self, odeint, method, tol, dtype=torch.float32):
        calls = [0]
        v = self.v.to(dtype)

        def velocity(x, t, **extras):
            calls[0] += 1
            return v(x, t)

        try:
            import flow_matching.solver.ode_solver as fm
        except ImportError:
            fm = None
        with torch.no_grad():
            if fm is not None and dtype == torch.float32:
                saved, fm.odeint = fm.odeint, odeint
                try:
                    y = fm.ODESolver(velocity).sample(self.x0, method=method, step_size=None, atol=tol,
                                                      rtol=tol, time_grid=self.t)
                finally:
                    fm.odeint = saved
            else:
                y = odeint(lambda t, x: velocity(x, t), self.x0.to(dtype), self.t.to(dtype), method=method,
                           rtol=tol, atol=tol)[-1]
        return y, calls[0]


class CNFProblem:
    """The FFJORD toy CNF of workloads.py: ``(z, logp)`` from t = 0 to 1."""

    def __init__(self):
        _, self.func, self.y0, _ = cnf_workload()
        self.func.requires_grad_(False)
        self.t = torch.tensor([0.0, 1.0])

    def solve(self, odeint, method, tol, dtype=torch.float32):
        func = self.func.to(dtype)
        func.calls = 0
        y0 = tuple(p.to(dtype) for p in self.y0)
        with torch.no_grad():
            z, logp = odeint(func, y0, self.t.to(dtype), method=method, rtol=tol, atol=tol)
        return torch.cat([z[-1].reshape(-1), logp[-1].reshape(-1)]), func.calls


class DetestProblem:
    def __init__(self, name):
        self.fn, self.y0 = DETEST[name]
        self.t = _f64(0.0, 20.0)

    def solve(self, odeint, method, tol, dtype=torch.float64):
        f = Counted(self.fn)
        return odeint(f, self.y0.to(dtype), self.t.to(dtype), method=method, rtol=tol, atol=tol)[-1], f.calls


def torchode_odeint(method_cls):
    """A torchdiffeq-style ``odeint`` on torchode (the whole state as one batch element, so its
    per-sample step control is one solve), with its integral controller."""
    import torchode as to

    def odeint(func, y0, t, method=None, rtol=1e-7, atol=1e-9):
        shape = y0.shape
        term = to.ODETerm(lambda tt, y: func(tt[0], y.reshape(shape)).reshape(1, -1))
        step = getattr(to, method_cls)(term=term)
        ctrl = to.IntegralController(atol=atol, rtol=rtol, term=term)
        solver = to.AutoDiffAdjoint(step, ctrl)
        sol = solver.solve(to.InitialValueProblem(y0=y0.reshape(1, -1), t_eval=t.reshape(1, -1)))
        return sol.ys[0].reshape(len(t), *shape)

    return odeint


# ---------------------------------------------------------------------------------- measuring

def error_of(y, ref):
    """Max over entries of |y - ref| / (1 + |ref|) (absolute for small, relative for large entries)."""
    y, ref = y.double().reshape(-1), ref.reshape(-1)
    return float(((y - ref).abs() / (1 + ref.abs())).max())


def nfe_at_error(points, err):
    """NFE at error ``err`` interpolated log-log along ``points`` [(nfe, err)] (None outside)."""
    pts = sorted((e, n) for n, e in points if e > 0 and math.isfinite(e))
    for (e0, n0), (e1, n1) in zip(pts, pts[1:]):
        if e0 <= err <= e1 and e1 > e0:
            w = (math.log(err) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
    return None


def measure(problem, libs, method, tols, ref):
    rows = []
    for tol in tols:
        row = {"tol": tol}
        for name, odeint in libs.items():
            try:
                y, nfe = problem.solve(odeint, method, tol)
                row[name] = (nfe, error_of(y, ref))
            except Exception as e:  # a peer's failure is a result too
                row[name] = (None, repr(e)[:60])
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--problems", nargs="+", default=list(DETEST) + ["flow", "cnf"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchdiffeq

    try:
        import torchode  # noqa: F401
        have_torchode = True
    except ImportError:
        have_torchode = False
    problems = {}
    for name in args.problems:
        problems[name] = (FlowProblem() if name == "flow" else CNFProblem() if name == "cnf"
                          else DetestProblem(name))
    refs = {}
    for name, prob in problems.items():
        tight = 1e-13 if name in DETEST else 1e-11
        refs[name] = prob.solve(pob_tdq.odeint, "dopri8", tight, dtype=torch.float64)[0]

    summary = []
    for method in args.methods:
        peer = "torchdiffeq" if method != "tsit5" else "torchode"
        libs = {"pyode-bridge": pob_tdq.odeint}
        if method != "tsit5":
            libs["torchdiffeq"] = torchdiffeq.odeint
        if have_torchode and method in TORCHODE:
            libs["torchode"] = torchode_odeint(TORCHODE[method])
        if peer not in libs:
            continue
        print(f"\n### {method} (peer: {peer})\n")
        cols = [n for n in libs if n != "pyode-bridge"]
        head = "| problem | tol | " + " | ".join(f"NFE {n}" for n in ["pyode-bridge"] + cols) + \
               " | ratio | " + " | ".join(f"err {n}" for n in ["pyode-bridge"] + cols) + " | at equal error |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        eq_tol, eq_err = [], []
        for pname, prob in problems.items():
            # float32 problems: errors below 1e-6 are rounding, not the method's.
            tols = [t for t in TOLS[method] if pname in DETEST or t >= 1e-6]
            # The torchode wrapper takes a tensor state, not the CNF's (z, logp).
            rows = measure(prob, {n: f for n, f in libs.items() if not (n == "torchode" and pname == "cnf")},
                           method, tols, refs[pname])
            for r in rows:
                for n in cols:
                    r.setdefault(n, (None, "n/a"))
            peer_pts = [r[peer] for r in rows if r[peer][0] is not None]
            for r in rows:
                ours, theirs = r["pyode-bridge"], r[peer]
                ratio = at_err = None
                if ours[0] is not None and theirs[0] is not None:
                    ratio = ours[0] / theirs[0]
                    ok = ratio <= 1.1 or ours[1] * 2 <= theirs[1]
                    eq_tol.append((ratio, ok, pname, r["tol"]))
                    n_peer = nfe_at_error(peer_pts, ours[1])
                    if n_peer is not None:
                        at_err = ours[0] / n_peer
                        eq_err.append((at_err, pname, r["tol"]))
                nfes = " | ".join("-" if r[n][0] is None else str(r[n][0]) for n in ["pyode-bridge"] + cols)
                errs = " | ".join(r[n][1] if r[n][0] is None else f"{r[n][1]:.1e}"
                                  for n in ["pyode-bridge"] + cols)
                print(f"| {pname} | {r['tol']:g} | {nfes} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                      f"{errs} | {'-' if at_err is None else f'{at_err:.2f}'} |", flush=True)
        bad = [(round(x, 2), p, t) for x, ok, p, t in eq_tol if not ok]
        summary.append((method, peer, statistics.median(x for x, *_ in eq_tol), max(x for x, *_ in eq_tol),
                        bad, statistics.median(x for x, *_ in eq_err) if eq_err else None,
                        max(eq_err) if eq_err else None))
    print("\n| method | peer | NFE ratio at equal tol (median / max) | misses of the 1.1x rule "
          "(ratio, problem, tol) | NFE ratio at equal error (median / max at) |")
    print("|---|---|---|---|---|")
    for method, peer, med, mx, bad, emed, emax in summary:
        e = "-" if emed is None else f"{emed:.2f} / {emax[0]:.2f} ({emax[1]} {emax[2]:g})"
        print(f"| {method} | {peer} | {med:.2f} / {mx:.2f} | {bad if bad else 'none'} | {e} |")


if __name__ == "__main__":
    main()
