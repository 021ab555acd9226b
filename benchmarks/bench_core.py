"""Forward and forward+backward time of ``odeint`` (backprop) against torchdiffeq's ``odeint``.

Same problem, same tolerance, same process, interleaved repetitions; prints medians and ratios.
Issue targets: forward+backward <= 0.7x torchdiffeq on the MLP, <= 0.8x on the conv pair.

    python benchmarks/bench_core.py [--workloads mlp conv] [--reps 15] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchdiffeq
import workloads
from workloads import WORKLOADS, clone_state, first, last, loss_of, median, timed

import pyode_bridge as pob


def run(lib, func, y0, tol, backward):
    t = torch.tensor([0.0, 1.0], device=first(y0).device, dtype=first(y0).dtype)
    y = clone_state(y0, backward)
    func.calls = 0
    ys = lib.odeint(func, y, t, rtol=tol, atol=tol, method="dopri5")
    if backward:
        loss_of(last(ys)).backward()
    return func.calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["mlp", "conv", "cnf"], choices=sorted(WORKLOADS))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process: CPU time of this process (robust to other jobs on a shared CPU)")
    args = ap.parse_args(argv)
    if args.clock == "process":
        workloads.CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    libs = {"torchdiffeq": torchdiffeq, "pyode_bridge": pob}
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for wname in args.workloads:
        name, func, y0, tol = WORKLOADS[wname](device=args.device)
        reps = max(3, args.reps // 3) if wname == "conv" else args.reps
        print(f"\n== {name}")
        res = {}
        for phase, backward in (("forward", False), ("forward+backward", True)):
            times = {k: [] for k in libs}
            nfe = {}
            for lib in libs.values():  # warm-up
                run(lib, func, y0, tol, backward)
            for _ in range(reps):
                for k, lib in libs.items():  # interleaved so drift hits both alike
                    func.zero_grad(set_to_none=True)
                    dt, calls = timed(lambda lib=lib: run(lib, func, y0, tol, backward), args.device)
                    times[k].append(dt)
                    nfe[k] = calls
            med = {k: median(v) for k, v in times.items()}
            res[phase] = med
            ratio = med["pyode_bridge"] / med["torchdiffeq"]
            print(f"{phase:>17}: torchdiffeq {med['torchdiffeq'] * 1e3:8.2f} ms (NFE {nfe['torchdiffeq']}), "
                  f"pyode_bridge {med['pyode_bridge'] * 1e3:8.2f} ms (NFE {nfe['pyode_bridge']}), "
                  f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
