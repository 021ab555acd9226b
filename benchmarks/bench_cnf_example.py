"""torchdiffeq's ``examples/cnf.py --adjoint`` through ``pyode_bridge.torchdiffeq`` against torchdiffeq
itself: time per training iteration, forward/backward NFE, and each library's gradient error
against a float64 tight-tolerance reference of the same loss (issue 16, item 8).

The model and the training loop are the example's (rewritten here, not copied): a CNF whose
velocity field is a width-64 mixture of tanh units with weights from a hyper-network of ``t``
(hidden 32), exact trace by autograd, state ``(z, logp)``, 512 samples of sklearn's
``make_circles`` per iteration, solved from t = 10 to t = 0 by ``odeint_adjoint`` (dopri5,
rtol = atol = 1e-5), loss the mean negative log-likelihood under N(0, 0.1 I), Adam at 1e-3.

Each library trains its own copy of the same initial model on the same batches, one iteration of
each in turn (order alternating), so both see the same machine load; the ratio of the summed
times and the median of the per-iteration ratios are printed. Every ``--check_every``
iterations, both libraries' gradients are taken at torchdiffeq's current parameters and batch and
compared (relative L2 over all parameters) with ``pyode_bridge.odeint(..., sensitivity=
"checkpointed")`` in float64 at rtol = atol = ``--ref_tol``.

``--before PATH`` adds a third variant: the ``pyode_bridge`` package of another checkout (e.g.
``git archive <commit> pyode_bridge | tar -x -C PATH``) through its own ``torchdiffeq`` module.

    python benchmarks/bench_cnf_example.py --iters 40 --threads 1 [--before /tmp/old]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import numpy as np
import torch
import torchdiffeq
from torch import nn

import pyode_bridge as pob
import pyode_bridge.torchdiffeq as pob_td

T0, T1 = 0.0, 10.0


class HyperNet(nn.Module):
    """``t -> (W (width, d, 1), B (width, 1, 1), U (width, 1, d))``: the example's hyper-network."""

    def __init__(self, dim=2, hidden=32, width=64):
        super().__init__()
        self.dim, self.width, self.block = dim, width, width * dim
        self.fc1, self.fc2 = nn.Linear(1, hidden), nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 3 * self.block + width)

    def forward(self, t):
        p = torch.tanh(self.fc2(torch.tanh(self.fc1(t.reshape(1, 1)))))
        p = self.fc3(p).reshape(-1)
        b, w, d = self.block, self.width, self.dim
        gate = torch.sigmoid(p[2 * b:3 * b].reshape(w, 1, d))
        return p[:b].reshape(w, d, 1), p[3 * b:].reshape(w, 1, 1), p[b:2 * b].reshape(w, 1, d) * gate


class CNF(nn.Module):
    """``(t, (z (B, d), logp (B, 1))) -> (dz/dt, -tr(df/dz))``, counting its calls in ``nfe``."""

    def __init__(self, dim=2, hidden=32, width=64):
        super().__init__()
        self.hyper, self.width, self.nfe = HyperNet(dim, hidden, width), width, 0

    def forward(self, t, state):
        self.nfe += 1
        z = state[0]
        with torch.enable_grad():
            z.requires_grad_(True)
            W, B, U = self.hyper(t)
            h = torch.tanh(z.unsqueeze(0).repeat(self.width, 1, 1) @ W + B)
            dz = (h @ U).mean(0)
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
                        for i in range(z.shape[1]))
        return dz, -trace.reshape(-1, 1)


def batches(n, samples, seed):
    from sklearn.datasets import make_circles

    rng = np.random.RandomState(seed)
    return [torch.tensor(make_circles(n_samples=samples, noise=0.06, factor=0.5, random_state=rng)[0],
                         dtype=torch.float32) for _ in range(n)]


def loss_and_nfe(solve, func, x):
    """The example's loss and the forward/backward NFE of one iteration (gradients left in .grad)."""
    dtype = next(func.parameters()).dtype
    x = x.to(dtype)
    prior = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=dtype), 0.1 * torch.eye(2, dtype=dtype))
    func.zero_grad(set_to_none=True)
    func.nfe = 0
    t = torch.tensor([T1, T0], dtype=dtype)
    z, logp = solve(func, (x, torch.zeros(x.shape[0], 1, dtype=dtype)), t)
    nfe_fwd = func.nfe
    loss = -(prior.log_prob(z[-1]) - logp[-1].reshape(-1)).mean()
    loss.backward()
    return float(loss.detach()), nfe_fwd, func.nfe - nfe_fwd


def flat_grad(func):
    return torch.cat([p.grad.reshape(-1) for p in func.parameters()]).double()


def adjoint_solver(lib, tol=1e-5, **kwargs):
    return lambda f, y0, t: lib.odeint_adjoint(f, y0, t, rtol=tol, atol=tol, method="dopri5", **kwargs)


def reference_gradient(func, x, tol):
    ref = CNF()
    ref.load_state_dict(func.state_dict())
    ref = ref.double()
    loss_and_nfe(lambda f, y0, t: pob.odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5",
                                             sensitivity="checkpointed"), ref, x)
    return flat_grad(ref)


def run(variants, iters=40, samples=512, seed=0, check_every=10, ref_tol=1e-9, lr=1e-3, log=print):
    """Train one model copy per variant (``{name: solve}``; the first is the baseline) in turn.

    Returns ``{name: {"time": [...], "nfe": [(fwd, bwd), ...], "err": [...]}}``."""
    torch.manual_seed(seed)
    init = CNF().state_dict()
    data = batches(iters, samples, seed)
    names = list(variants)
    models = {n: CNF() for n in names}
    for m in models.values():
        m.load_state_dict(init)
    opts = {n: torch.optim.Adam(models[n].parameters(), lr=lr) for n in names}
    out = {n: {"time": [], "nfe": [], "err": []} for n in names}
    for it, x in enumerate(data):
        if check_every and it % check_every == 0:
            # Gradient error of every variant at the baseline's parameters and this batch.
            at = CNF()
            at.load_state_dict(models[names[0]].state_dict())
            ref = reference_gradient(at, x, ref_tol)
            for n in names:
                loss_and_nfe(variants[n], at, x)
                out[n]["err"].append(float((flat_grad(at) - ref).norm() / ref.norm()))
        order = names if it % 2 == 0 else names[::-1]
        for n in order:
            start = time.perf_counter()
            _, nf, nb = loss_and_nfe(variants[n], models[n], x)
            opts[n].step()
            out[n]["time"].append(time.perf_counter() - start)
            out[n]["nfe"].append((nf, nb))
        if log is not None and it % 10 == 0:
            log(f"iter {it}: " + ", ".join(f"{n} {out[n]['nfe'][-1]}" for n in names))
    return out


def summary(out):
    """Rows ``(name, total s, ratio of totals, median per-iteration ratio, median fwd/bwd NFE,
    median and max gradient error)`` relative to the first variant."""
    names = list(out)
    base = out[names[0]]["time"]
    rows = []
    for n in names:
        ts, nfe = out[n]["time"], out[n]["nfe"]
        rows.append((n, sum(ts), sum(ts) / sum(base), statistics.median(a / b for a, b in zip(ts, base)),
                     statistics.median(f for f, _ in nfe), statistics.median(b for _, b in nfe),
                     statistics.median(out[n]["err"]) if out[n]["err"] else float("nan"),
                     max(out[n]["err"]) if out[n]["err"] else float("nan")))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--check_every", type=int, default=10)
    ap.add_argument("--ref_tol", type=float, default=1e-9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=None, help="a checkout (or archive) holding pyode_bridge/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {"torchdiffeq odeint_adjoint": adjoint_solver(torchdiffeq),
                "pob_td odeint_adjoint": adjoint_solver(pob_td)}
    if args.before:
        from bench_ab import load_before

        variants["pob_td before"] = adjoint_solver(importlib.import_module(load_before(args.before).__name__
                                                                           + ".torchdiffeq"))
    out = run(variants, args.iters, args.samples, args.seed, args.check_every, args.ref_tol)
    print(f"\n{args.iters} iterations, batch {args.samples}, dopri5 rtol = atol = 1e-5; gradient error "
          f"vs float64 checkpointed at {args.ref_tol:g} every {args.check_every} iterations")
    print("| library | total s | ratio (totals) | median ratio | NFE fwd/bwd (median) | grad err median / max |")
    print("|---|---|---|---|---|---|")
    for n, tot, r, mr, nf, nb, em, ex in summary(out):
        print(f"| {n} | {tot:.2f} | {r:.3f} | {mr:.3f} | {nf:g}/{nb:g} | {em:.1e} / {ex:.1e} |")


if __name__ == "__main__":
    main()
