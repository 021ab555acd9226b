"""Two versions of pyode-bridge on the same workloads, in one process: is a change slower?

Separate processes on a shared machine differ by more than most changes do; in one process, with
the two versions' solves alternating (A B, then B A, ...), the per-round ratio is stable. The
other version is imported from a copy of its ``pyode_bridge`` folder renamed (its imports are
relative, so the copy is self-contained).

    git worktree add /tmp/old <commit>        # or: git archive <commit> pyode_bridge | tar -x -C /tmp/old
    python benchmarks/bench_ab.py --before /tmp/old --workloads mlp conv cnf --rounds 30

Prints, per workload and phase (forward; forward+backward with ``backprop``), both medians and the
median over rounds of after/before (CPU time of the process, one thread).
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import pathlib
import shutil
import sys
import tempfile
import time

import torch
from workloads import WORKLOADS, clone_state, last, loss_of, median

import pyode_bridge as after


def load_before(root: str):
    """The ``pyode_bridge`` package under ``root``, imported as ``pob_before``."""
    tmp = pathlib.Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(pathlib.Path(root) / "pyode_bridge", tmp / "pob_before")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("pob_before")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout (or archive) holding pyode_bridge/")
    ap.add_argument("--workloads", nargs="+", default=["mlp", "conv", "cnf"], choices=sorted(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    before = load_before(args.before)
    t = torch.tensor([0.0, 1.0])
    print(f"before: {args.before}; after: {pathlib.Path(after.__file__).parent}")
    for wname in args.workloads:
        name, func, y0, tol = WORKLOADS[wname]()

        def run(lib, backward):
            y = clone_state(y0, backward)
            ys = lib.odeint(func, y, t, rtol=tol, atol=tol, method="dopri5")
            if backward:
                loss_of(last(ys)).backward()

        for lib in (before, after):  # warm-up
            for bw in (False, True):
                run(lib, bw)
        rounds = max(3, args.rounds // 4) if wname == "conv" else args.rounds
        times = {}
        for r in range(rounds):
            for bw in (False, True):
                for lib in ((before, after) if r % 2 else (after, before)):
                    func.zero_grad(set_to_none=True)
                    start = time.process_time()
                    run(lib, bw)
                    times.setdefault((lib is after, bw), []).append(time.process_time() - start)
        print(f"\n== {name} ({rounds} rounds)")
        for bw in (False, True):
            b, a = times[(False, bw)], times[(True, bw)]
            ratio = median([x / y for x, y in zip(a, b)])
            print(f"  {'forward+backward' if bw else 'forward':>16}: before {median(b) * 1e3:8.2f} ms, "
                  f"after {median(a) * 1e3:8.2f} ms, after/before {ratio:.3f}")


if __name__ == "__main__":
    main()
