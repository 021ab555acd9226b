"""Train a latent ODE on irregularly sampled series: synthetic spirals, each observed at its own
random times.

Every spiral ``x(t) = exp(a t) R(+-w t) x0`` (clockwise or counter-clockwise, its own start point) is
observed at ``--obs`` random times of ``[0, --span]`` (the first at 0) with noise. The model encodes
the first three observations (and their times) into a latent state ``z0``, integrates
``dz/dt = f(z)`` and decodes every observation time linearly; the loss is the mean squared error.

No two series share their times, and torchdiffeq's ``odeint`` takes one time grid per solve. Two
ways to train:

- ``union`` (works today, torchdiffeq's advice): solve the batch once on the union of all the
  series' times (sorted, without repeats: up to batch x obs outputs) and pick each series' own
  times out of it. Every series is integrated over the longest span, and the batch shares one step
  size.
- ``per_sample``: pass the ``(B, T)`` times, ``odeint(func, z0, t)``, row ``b`` of ``t`` for
  series ``b`` (per-sample solving, docs/per_sample.md): each row is integrated over its own span
  with its own steps and error test, and its outputs are exactly its own times.

Printed per mode: time per iteration, memory kept for the backward of one iteration
(``pyode_bridge.memory.measure_saved_bytes``), forward evaluations, and the loss on training and
held-out spirals.

    python examples/irregular_spirals.py --quick
    python examples/irregular_spirals.py --mode both --iters 300
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from _common import add_run_args, fmt_bytes, setup_run
from torch import nn

import pyode_bridge as pob
from pyode_bridge.memory import measure_saved_bytes

MODES = ("union", "per_sample")


def spirals(n: int, obs: int, span: float, noise: float, generator: torch.Generator):
    """``n`` spirals observed at their own times.

    Returns ``(t, x)``: ``t`` ``(n, obs)`` strictly increasing, each row starting at 0; ``x``
    ``(n, obs, 2)`` the noisy observations.
    """
    g = generator
    t = torch.cat([torch.zeros(n, 1), span * torch.rand(n, obs - 1, generator=g).sort(dim=1).values], dim=1)
    turn = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1.0, -1.0) * 1.5  # angular speed, both ways
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    radius = (0.8 + 0.4 * torch.rand(n, 1, generator=g)) * torch.exp(-0.25 * t)
    angle = phase + turn * t
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
    return t, x + noise * torch.randn(x.shape, generator=g)


class LatentODE(nn.Module):
    """Encoder (first three observations and their times) -> ``z0``; ``dz/dt = f(z)``; a linear
    decoder. ``forward(t, x)``: ``t`` ``(B, T)``, ``x`` ``(B, T, 2)`` -> predictions ``(B, T, 2)``."""

    def __init__(self, latent: int = 6, hidden: int = 32, mode: str = "union", tol: float = 1e-3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(9, hidden), nn.Tanh(), nn.Linear(hidden, latent))
        self.field = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, latent))
        self.decoder = nn.Linear(latent, 2)
        self.mode, self.tol = mode, tol
        self.stats = pob.SolveStats()

    def dynamics(self, t, z):
        """Autonomous: ``t`` (0-d, or ``(B,)`` per sample) is not used."""
        return self.field(z)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z0 = self.encoder(torch.cat([x[:, :3].flatten(1), t[:, :3]], dim=1))
        self.stats = pob.SolveStats()
        kw = dict(rtol=self.tol, atol=self.tol, method="dopri5", stats=self.stats)
        if self.mode == "per_sample":
            zs = pob.odeint(self.dynamics, z0, t, **kw).transpose(0, 1)  # (T, B, L) -> (B, T, L)
        else:
            t_union = torch.unique(t)  # sorted, no repeats
            zs_union = pob.odeint(self.dynamics, z0, t_union, **kw)  # (U, B, L)
            zs = zs_union[torch.searchsorted(t_union, t), torch.arange(t.shape[0])[:, None]]
        return self.decoder(zs)


def train(mode: str, args, data, device) -> dict:
    (t, x), (t_test, x_test) = data
    torch.manual_seed(args.seed)
    model = LatentODE(mode=mode, tol=args.tol).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    losses, nfe, start = [], 0, time.perf_counter()
    for _ in range(args.iters):
        idx = torch.randperm(t.shape[0], generator=gen)[:args.batch]
        opt.zero_grad()
        loss = (model(t[idx], x[idx]) - x[idx]).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        nfe += model.stats.nfe_forward
    per_iter = (time.perf_counter() - start) / args.iters
    idx = torch.arange(args.batch)
    kept = measure_saved_bytes(lambda: (model(t[idx], x[idx]) - x[idx]).pow(2).mean(), exclude=[model])
    with torch.no_grad():
        test = (model(t_test, x_test) - x_test).pow(2).mean().item()
    last = losses[-10:]
    return {"mode": mode, "ms_per_iter": 1e3 * per_iter, "kept_bytes": kept.total_bytes,
            "nfe_per_iter": nfe / args.iters, "loss_first": losses[0], "loss_last": sum(last) / len(last),
            "test_mse": test}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=[*MODES, "both"], default="both",
                   help="union of times, per-sample times, or both (default)")
    p.add_argument("--iters", type=int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--batch", type=int, default=64, help="spirals per step (default 64)")
    p.add_argument("--obs", type=int, default=16, help="observations per spiral (default 16)")
    p.add_argument("--span", type=float, default=6.0, help="longest observation time (default 6)")
    p.add_argument("--train", type=int, default=512, help="training spirals (default 512)")
    p.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of dopri5 (default 1e-3)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--quick", action="store_true", help="40 steps of 32 spirals, 8 observations (seconds)")
    add_run_args(p, "irregular_spirals")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.batch, args.obs, args.train = 40, 32, 8, 128
    if args.obs < 3:
        p.error("--obs must be at least 3 (the encoder reads the first three observations)")
    return args


def main(argv=None) -> list:
    """Run the script; returns one dict per mode trained."""
    args = parse_args(argv)
    device, _ = setup_run(args)
    gen = torch.Generator().manual_seed(args.seed)
    data = tuple(tuple(a.to(device) for a in spirals(n, args.obs, args.span, 0.02, gen))
                 for n in (args.train, args.batch))
    print(f"{args.train} spirals of {args.obs} observations at their own times in [0, {args.span:g}]; "
          f"batch {args.batch}: the union of a batch's times has up to {args.batch * (args.obs - 1) + 1} times")
    results = []
    for mode in (MODES if args.mode == "both" else (args.mode,)):
        r = train(mode, args, data, device)
        results.append(r)
        print(f"{mode:10s} {r['ms_per_iter']:8.1f} ms/iter | kept for backward {fmt_bytes(r['kept_bytes'])} | "
              f"{r['nfe_per_iter']:.0f} evals/iter | loss {r['loss_first']:.4f} -> {r['loss_last']:.4f} | "
              f"held-out mse {r['test_mse']:.4f}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
