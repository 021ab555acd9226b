"""Per-sample events (issue 18): one batched per-sample event search against a loop of the joint
search on each sample alone, on B falling balls with their own gravity and a small learned (MLP)
force, dopri5, float64.

Prints the evaluations of ``func`` and ``event_fn`` (counts: machine independent), the largest
difference of the event times, and the medians of interleaved rounds (forward under no_grad, and
forward+backward with ``backprop``) with their ratio.

    python benchmarks/bench_per_sample_events.py --rows 64 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

import pyode_bridge as pob


def problem(rows: int) -> tuple[Callable[..., Any], torch.Tensor, torch.Tensor, torch.nn.Module]:
    """``field(g) -> func``, the rows' gravities ``g`` ``(B,)``, ``y0`` ``(B, 2)`` and the MLP."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    g = torch.linspace(1.0, 20.0, rows, dtype=torch.float64)
    y0 = torch.stack([torch.linspace(0.5, 5.0, rows), torch.zeros(rows)], 1).double()

    def field(gg: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.stack([y[:, 1], -gg.expand(y.shape[0])], 1) + 0.1 * net(y)
        return f
    return field, g, y0, net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    field, g, y0, net = problem(args.rows)
    calls = {"event_fn": 0}

    def event_fn(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["event_fn"] += 1
        return y[:, 0]

    kw: dict[str, Any] = dict(event_fn=event_fn, rtol=1e-7, atol=1e-9)

    def batched(backward: bool) -> tuple[torch.Tensor, int]:
        stats = pob.SolveStats()
        with torch.set_grad_enabled(backward):
            t_e, _ = pob.odeint_event(field(g), y0, torch.zeros(args.rows, dtype=torch.float64), stats=stats, **kw)
            if backward:
                t_e.sum().backward()
        return t_e.detach(), stats.nfe_forward

    def singles(backward: bool) -> tuple[torch.Tensor, int]:
        out, nfe = [], 0
        for b in range(args.rows):
            stats = pob.SolveStats()
            with torch.set_grad_enabled(backward):
                t_e, _ = pob.odeint_event(field(g[b:b + 1]), y0[b:b + 1], 0.0, stats=stats, **kw)
                if backward:
                    t_e.backward()
            out.append(t_e.detach())
            nfe += stats.nfe_forward
        return torch.stack(out), nfe

    counts = {}
    for name, run in (("per-sample", batched), ("single loop", singles)):
        calls["event_fn"] = 0
        t_e, nfe = run(False)
        counts[name] = (t_e, nfe, calls["event_fn"])
    diff = float((counts["per-sample"][0] - counts["single loop"][0]).abs().max())
    print(f"{args.rows} rows, dopri5 rtol 1e-7: max |t_e difference| {diff:.2g}")
    for name, (_, nfe, ev) in counts.items():
        print(f"  {name:12s} func calls {nfe:6d}  event_fn calls {ev:6d}")
    for backward in (False, True):
        times: dict[str, list[float]] = {"per-sample": [], "single loop": []}
        for _ in range(args.rounds):  # interleaved: both see the same machine load
            for name, run in (("per-sample", batched), ("single loop", singles)):
                start = time.perf_counter()
                run(backward)
                times[name].append(time.perf_counter() - start)
                net.zero_grad()
        med = {k: statistics.median(v) for k, v in times.items()}
        what = "forward+backward (backprop)" if backward else "forward"
        print(f"  {what:28s} per-sample {1e3 * med['per-sample']:8.1f} ms  single loop "
              f"{1e3 * med['single loop']:8.1f} ms  loop / per-sample {med['single loop'] / med['per-sample']:.2f}")


if __name__ == "__main__":
    main()
