"""DistributedDataParallel training of an ODE-block model with every gradient method.

Two CPU processes (gloo, rendezvous through a ``file://`` in a temporary folder, no TCP port) each
train on half of a global batch for a few SGD-with-momentum steps; the parameters must equal those
of a single process training on the whole batch (to 1e-10), and be bitwise the same on both ranks.

The solve is fixed-step (rk4, float64), so each rank's solve is the same discrete map as the
global-batch solve - an adaptive solver would pick its steps from each rank's own error norm. (The
gradient-only DDP check for backprop/interpolated lives in test_nn.py; this file trains, with all
methods, through the optimizer.)
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import SquashFunc
from torch import nn

import pyode_bridge as pob

torch.set_num_threads(1)

SENSITIVITIES = ["backprop", "checkpointed", "interpolated", "interpolating", "backsolve",
                 "interpolating-ckpt", "checkpointed-every2"]
STEPS, LR, MOMENTUM, WORLD, BATCH = 4, 0.2, 0.9, 2, 8


def _sensitivity(name):
    return {"interpolating-ckpt": pob.Interpolating(checkpointing=True, every=2),
            "checkpointed-every2": pob.Checkpointed(every=2)}.get(name, name)


def _model(name):
    torch.manual_seed(0)  # the same initial parameters in every process
    return nn.Sequential(nn.Linear(3, 4), pob.ODEBlock(SquashFunc(), t=(0.0, 0.5, 1.0), method="rk4",
                                                       steps=5, sensitivity=_sensitivity(name)),
                         nn.Linear(4, 2)).double()


def _data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(BATCH, 3, dtype=torch.float64, generator=g),
            torch.randn(BATCH, 2, dtype=torch.float64, generator=g))


def _train(model, x, y):
    """SGD with momentum; returns the loss of every step (of this process's part of the batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = _data()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        out = {}
        for name in SENSITIVITIES:
            model = DDP(_model(name))
            losses = _train(model, x[part], y[part])
            out[name] = {"params": [p.detach().clone() for p in model.module.parameters()],
                         "losses": losses}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks finish their collectives and drop DDP's reducer before the group is torn
        # down, and a rank whose results are saved leaves without the interpreter's finalisation:
        # gloo's threads aborted it there now and then ("terminate called without an active
        # exception", SIGABRT in about one full-suite run in three) after the work was done.
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", SENSITIVITIES)
def test_ddp_training_matches_single_process(ddp_results, name):
    x, y = _data()
    model = _model(name)
    initial = [p.detach().clone() for p in model.parameters()]
    losses = _train(model, x, y)
    r0, r1 = (r[name] for r in ddp_results)
    for p, p0, p1, p_init in zip(model.parameters(), r0["params"], r1["params"], initial):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # replicas never diverge
        assert not torch.equal(p0, p_init)  # it did train
        torch.testing.assert_close(p0, p.detach(), rtol=1e-10, atol=1e-12)
    # The global-batch loss is the mean of the two halves' losses (equal halves, MSE).
    for step, loss in enumerate(losses):
        assert abs(0.5 * (r0["losses"][step] + r1["losses"][step]) - loss) <= 1e-12 * max(1.0, loss)
    assert losses[-1] < losses[0]
