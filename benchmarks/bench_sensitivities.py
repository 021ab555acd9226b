"""Every gradient method side by side with the peers: time per iteration (forward+backward),
forward/backward NFE, memory kept for the backward, and gradient error against ``backprop``.

Peers in the same process: torchdiffeq ``odeint`` and ``odeint_adjoint``, and torchdyn's
``interpolated_adjoint`` where it imports (``pip install --no-deps torchdyn torchcde torchsde
trampoline`` plus ``pytorch_lightning attrs``). Repetitions are interleaved; medians are printed
with the ratio to torchdiffeq ``odeint_adjoint``.
Issue targets: ``interpolated`` and ``checkpointed`` <= 0.6x torchdiffeq ``odeint_adjoint`` on
both workloads, and backward NFE of ``interpolated`` below that of ``backsolve``.

Memory: on CUDA the allocator's peak during forward+backward; on CPU the bytes the forward keeps
alive for the backward (autograd-saved tensors and the tensors held by the autograd context).

    python benchmarks/bench_sensitivities.py [--workloads mlp conv] [--reps 7] [--device cpu]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchdiffeq
from workloads import WORKLOADS, clone_state, first, last, loss_of, median, state_grads, sync

import pyode_bridge as pob
from pyode_bridge.memory import measure_saved_bytes

try:  # optional peer
    from torchdyn.core import NeuralODE
except Exception:  # noqa: BLE001 - any import failure just drops the column
    NeuralODE = None


def make_runners(func, t, tol, tuple_state=False):
    """name -> fn(y) returning (output to put a loss on, fn that reads the graph context)."""
    runners = {}
    for name, sens in [("pob backprop", "backprop"), ("pob checkpointed", "checkpointed"),
                       ("pob interpolated(16)", pob.Interpolated(nodes=16)),
                       ("pob interpolated(auto)", pob.Interpolated(nodes="auto")),
                       ("pob interpolating", "interpolating"), ("pob backsolve", pob.Backsolve())]:
        runners[name] = (lambda y, s=sens: last(pob.odeint(func, y, t, rtol=tol, atol=tol, sensitivity=s)))
    # What leaving the parameter integral out of the backward error norm saves (and risks).
    for name, sens in [("pob interpolating seminorm", "interpolating"), ("pob backsolve seminorm", pob.Backsolve())]:
        runners[name] = (lambda y, s=sens: last(pob.odeint(func, y, t, rtol=tol, atol=tol, sensitivity=s,
                                                           adjoint_options={"norm": "seminorm"})))
    runners["torchdiffeq odeint"] = lambda y: last(torchdiffeq.odeint(func, y, t, rtol=tol, atol=tol))
    runners["torchdiffeq odeint_adjoint"] = lambda y: last(torchdiffeq.odeint_adjoint(func, y, t, rtol=tol, atol=tol))
    if NeuralODE is not None and not tuple_state:  # torchdyn's adjoints take one tensor state
        flat = _Flattened(func)  # torchdyn's interpolated adjoint handles (batch, features) states only
        node = NeuralODE(flat, solver="dopri5", sensitivity="interpolated_adjoint", atol=tol, rtol=tol,
                         atol_adjoint=tol, rtol_adjoint=tol, return_t_eval=False)

        def run_torchdyn(y):
            flat.shape = y.shape
            return node(y.reshape(y.shape[0], -1), t)[-1]

        runners["torchdyn interpolated_adjoint"] = run_torchdyn
    return runners


class _Flattened(torch.nn.Module):
    def __init__(self, func):
        super().__init__()
        self.func, self.shape = func, None

    def forward(self, t, y, args=None):
        return self.func(t, y.view(self.shape)).reshape(y.shape)


def one_iteration(run, func, y0, device, measure=False):
    """Forward+backward; returns (seconds, nfe_fwd, nfe_bwd, grads, kept_bytes or None)."""
    func.zero_grad(set_to_none=True)
    y = clone_state(y0, True)
    func.calls = 0
    kept = None
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(device)
    start = time.perf_counter()
    if measure and not str(device).startswith("cuda"):
        # what the forward keeps alive for the backward: autograd-saved tensors plus the tensors
        # an autograd.Function context holds (checkpoints, interpolation nodes, dense output)
        leaves = list(y0) + list(y) if isinstance(y, tuple) else [y0, y]
        saved = measure_saved_bytes(run, y, exclude=[func] + leaves)
        out, kept = saved.output, saved.total_bytes
    else:
        out = run(y)
    nfe_f = func.calls
    loss_of(out).backward()
    sync(device)
    dt = time.perf_counter() - start
    if str(device).startswith("cuda"):
        kept = torch.cuda.max_memory_allocated() - base  # peak over forward+backward
    grads = torch.cat(state_grads(y) + [p.grad.reshape(-1) for p in func.parameters()])
    return dt, nfe_f, func.calls - nfe_f, grads, kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["mlp", "conv", "cnf"], choices=sorted(WORKLOADS))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the backsolve guard's warnings would interleave the table
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"torchdyn {'yes' if NeuralODE is not None else 'not installed'}")
    for wname in args.workloads:
        name, func, y0, tol = WORKLOADS[wname](device=args.device)
        t = torch.tensor([0.0, 1.0], device=first(y0).device, dtype=first(y0).dtype)
        runners = make_runners(func, t, tol, tuple_state=isinstance(y0, tuple))
        reps = max(3, args.reps // 2) if wname == "conv" else args.reps
        times = {k: [] for k in runners}
        info = {}
        for k, run in runners.items():  # warm-up and the non-timing figures
            _, nf, nb, g, kept = one_iteration(run, func, y0, args.device, measure=True)
            info[k] = (nf, nb, g, kept)
        for _ in range(reps):
            for k, run in runners.items():
                dt, *_ = one_iteration(run, func, y0, args.device)
                times[k].append(dt)
        ref = info["pob backprop"][2]
        base = median(times["torchdiffeq odeint_adjoint"])
        print(f"\n== {name}")
        print(f"{'method':<30} {'s/iter':>9} {'vs tdq adj':>10} {'NFE f/b':>9} {'kept MB':>9} {'grad err':>10}")
        for k in runners:
            nf, nb, g, kept = info[k]
            err = ((g - ref).norm() / ref.norm()).item()
            m = median(times[k])
            print(f"{k:<30} {m:9.4f} {m / base:10.2f} {f'{nf}/{nb}':>9} {kept / 2**20:9.2f} {err:10.2e}")


if __name__ == "__main__":
    main()
