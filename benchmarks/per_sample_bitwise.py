"""Per-sample solving, bit for bit against another version of the package (issue 18: a speed-up must
not change a number).

``save PKG OUT`` runs the cases below with the ``pyode_bridge`` found in the directory ``PKG`` and
saves every output, gradient (parameters, ``y0`` and, where asked, ``t``), ``sample_steps``,
``sample_status``, evaluation and step count (or the error message) to ``OUT``; ``compare A B``
prints the cases that differ. Cases: dopri5, tsit5, bosh3, dopri8 and fixed-step rk4, each with every
gradient method (backprop, checkpointed, backsolve, interpolating, interpolated) on plain and tuple
states, per-row ``jump_t``/``step_t``, reversed time, ``t`` gradients, ``interp="linear"`` and a
shared ``step_t``; masked and raised failures; ``max_num_steps``, ``min_step``, ``max_step``,
``first_step``, float32, a NaN row; the benchmark's workloads at 64 rows.

    git archive main pyode_bridge | tar -x -C /tmp/main_pkg
    python benchmarks/per_sample_bitwise.py save /tmp/main_pkg /tmp/main.pt
    python benchmarks/per_sample_bitwise.py save . /tmp/branch.pt
    python benchmarks/per_sample_bitwise.py compare /tmp/main.pt /tmp/branch.pt
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

D = torch.float64
B = 8
SENSITIVITIES = ["backprop", "checkpointed", "backsolve", "interpolating", "interpolated"]
METHODS = [("dopri5", {}), ("tsit5", {}), ("bosh3", {}), ("rk4", {"step_size": 0.05}), ("dopri8", {})]


class Field(torch.nn.Module):
    """A small MLP plus per-row decay and a forcing switched on at ``t = 0.55``; ``t`` ``(B,)``."""

    def __init__(self, tuple_state: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = torch.nn.Linear(2, 16).to(D), torch.nn.Linear(16, 2).to(D)
        self.k = torch.nn.Parameter(torch.logspace(-1, 1.5, B, dtype=D))
        self.tuple_state = tuple_state

    def forward(self, t, y):
        z = torch.cat(y, 1) if self.tuple_state else y
        f = self.l2(torch.tanh(self.l1(z))) - self.k[:, None] * z + torch.sin(t)[:, None] * (t[:, None] > 0.55)
        return (f[:, :1], f[:, 1:]) if self.tuple_state else f


WSCALE = torch.nn.Parameter(torch.tensor(1.0, dtype=D))


def blowup(t, y):
    """Rows with a positive rate blow up in finite time (y' = y^2 from 1 at t = 0: at t = 1)."""
    rate = torch.tensor([-1.0, 1.0, -2.0, -0.5, 1.0, -3.0, -1.5, -0.1], dtype=y.dtype)[:, None]
    return torch.where(rate > 0, y * y, rate * y) * WSCALE


def row_times(seed: int, reverse: bool) -> torch.Tensor:
    """``(B, 5)`` strictly monotone times, each row its own start and span."""
    g = torch.Generator().manual_seed(seed)
    span = 0.5 + 2 * torch.rand(B, 1, dtype=D, generator=g)
    start = torch.rand(B, 1, dtype=D, generator=g) * 0.3
    inner = span * torch.rand(B, 4, dtype=D, generator=g).sort(1).values.clamp_min(1e-3)
    t = torch.cat([start, start + inner + torch.arange(1, 5, dtype=D) * 1e-3], 1)
    return t.flip(1) if reverse else t


def record(out: dict, key: str, solve, params: list, y0: torch.Tensor, t: torch.Tensor | None = None) -> None:
    """Run ``solve(stats)`` and keep its outputs, gradients and counts (or its error) under ``key``."""
    import pyode_bridge as pob

    stats = pob.SolveStats()
    try:
        ys = solve(stats)
    except Exception as e:  # noqa: BLE001 - the message is compared
        out[key] = f"{type(e).__name__}: {e}"
        return
    ys = ys if isinstance(ys, tuple) else (ys,)
    loss = sum((y * torch.cos(torch.arange(y.numel(), dtype=D).reshape(y.shape))).nan_to_num(0.0).sum() for y in ys)
    wrt = [p for p in params if p.requires_grad] + [y0] + ([t] if t is not None else [])
    try:
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
    except Exception as e:  # noqa: BLE001 - a backward's error is compared too
        grads = [f"{type(e).__name__}: {e}"]
    out[key] = {"ys": [y.detach().clone() for y in ys], "grads": grads, "steps": stats.sample_steps,
                "status": stats.sample_status,
                "counts": (stats.nfe_forward, stats.steps_forward, stats.steps_rejected, stats.nfe_backward,
                           stats.steps_backward, stats.steps_backward_rejected)}


def save(pkg: str, path: str) -> None:
    sys.path.insert(0, os.path.abspath(pkg))
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    import pyode_bridge as pob

    assert pob.__file__.startswith(os.path.abspath(pkg)), pob.__file__
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    out: dict = {}
    for mi, (method, opts) in enumerate(METHODS):
        for sens in SENSITIVITIES:
            for case in ("plain", "tuple", "jump", "reverse", "tgrad", "interp_linear", "steps_t"):
                if case == "interp_linear" and method != "dopri5":
                    continue
                f = Field(tuple_state=case == "tuple")
                y0 = torch.randn(B, 2, dtype=D, generator=torch.Generator().manual_seed(mi)).requires_grad_(True)
                t = row_times(mi, reverse=case == "reverse")
                o = dict(opts)
                if case == "jump":
                    o["jump_t"] = (t[:, 0] + 0.37 * (t[:, -1] - t[:, 0]))[:, None]
                    o["step_t"] = (t[:, 0] + 0.11 * (t[:, -1] - t[:, 0]))[:, None]
                o.update({"steps_t": {"step_t": torch.tensor([0.61, 0.9], dtype=D)},
                          "interp_linear": {"interp": "linear"}}.get(case, {}))
                if case == "tgrad":
                    t = t.clone().requires_grad_(True)
                y_in = (y0[:, :1], y0[:, 1:]) if case == "tuple" else y0
                record(out, f"{method}/{sens}/{case}",
                       lambda st, f=f, y_in=y_in, t=t, o=o, m=method, s=sens: pob.odeint(
                           f, y_in, t, method=m, rtol=1e-6, atol=1e-8, options=o, sensitivity=s, stats=st),
                       list(f.parameters()), y0, t if case == "tgrad" else None)
    for method, opts in METHODS[:4]:
        for sens in SENSITIVITIES:
            for tol in (1e-6, 1e-9):
                for mode in ("mask", "raise"):
                    y0 = torch.ones(B, 1, dtype=D).requires_grad_(True)
                    o = {**opts, "step_control": "per_sample", "on_failure": mode}
                    record(out, f"fail/{method}/{sens}/{tol}/{mode}",
                           lambda st, y0=y0, o=o, m=method, s=sens, tol=tol: pob.odeint(
                               blowup, y0, torch.linspace(0, 2, 6, dtype=D), method=m, rtol=tol, atol=tol,
                               options=o, sensitivity=s, stats=st), [WSCALE], y0)
    rates = torch.logspace(-1, 2, 16, dtype=D)
    for name, o, dt in [("maxsteps", {"max_num_steps": 12, "on_failure": "mask"}, D),
                        ("maxstep", {"max_step": 0.07}, D), ("minstep", {"min_step": 0.05, "max_num_steps": 300}, D),
                        ("first", {"first_step": 0.01}, D), ("f32", {}, torch.float32), ("stiff", {}, D),
                        ("nonfinite", {"on_failure": "mask"}, D)]:
        for sens in SENSITIVITIES:
            kp = torch.nn.Parameter(rates.clone().to(dt))
            if name == "nonfinite":
                def fn(t, y, kp=kp):
                    return torch.cat([torch.log(-y[:1]) * kp[0], -kp[1:, None] * y[1:]])
            else:
                def fn(t, y, kp=kp):
                    return -kp[:, None] * (y - torch.sin(t.to(y.dtype))[:, None])
            y0 = torch.randn(16, 2, dtype=dt, generator=torch.Generator().manual_seed(3)).abs().requires_grad_(True)
            span = 1 + 4 * torch.rand(16, 1, dtype=D, generator=torch.Generator().manual_seed(4))
            t = torch.cat([torch.zeros(16, 1, dtype=D), span * torch.tensor([0.2, 0.5, 1.0], dtype=D)], 1).to(dt)
            record(out, f"misc/{name}/{sens}", lambda st, fn=fn, y0=y0, t=t, o=o, s=sens: pob.odeint(
                fn, y0, t, rtol=1e-6, atol=1e-8, options=o, sensitivity=s, stats=st), [kp], y0)
    import bench_per_sample as bench

    for workload in ("homogeneous", "heterogeneous"):
        field, y0, t2d, _ = bench.WORKLOADS[workload][0](64)
        y0 = y0.requires_grad_(True)
        record(out, f"bench/{workload}", lambda st, field=field, y0=y0, t2d=t2d: pob.odeint(
            field, y0, t2d, rtol=1e-5, atol=1e-5, method="dopri5", stats=st), list(field.parameters()), y0)
    torch.save(out, path)
    print(f"{len(out)} cases, {sum(isinstance(v, str) for v in out.values())} of them errors, saved to {path}")


def _same(x, y) -> bool:
    """Equal bit for bit where it matters: same shape and dtype, same values, NaN where the other is."""
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.isnan(), y.isnan())
                and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)))
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return x == y


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    differ = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not _same(a[k], b[k])]
    for k in differ:
        print("differs:", k)
    print(f"{len(a)} cases ({sum(isinstance(v, str) for v in a.values())} errors compared by message), "
          f"{len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("save", "compare"):
        sys.exit(__doc__)
    if sys.argv[1] == "save":
        save(sys.argv[2], sys.argv[3])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
