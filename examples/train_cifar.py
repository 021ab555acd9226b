"""Train an ODE classifier on CIFAR-10/100 with the papers' recipes; resumable mid-epoch.

Models (:func:`pyode_bridge.models.build_model`) and their default recipes:

``odenet`` (IRDM, Daulbaev et al. 2020, sec. B.1)
    conv3x3-BN-ReLU, one ODE block of two weight-normalised 64-channel 3x3 convolutions with ReLU,
    dopri5, gradient ``interpolated`` (16 Chebyshev nodes). SGD, momentum 0.9, weight decay 1e-5,
    fixed learning rate 5e-3, batch 100; rtol = atol = 1e-5, divided by 10 after every 150 epochs;
    300 epochs.

``resnet`` / ``sqnxt`` (ANODE, Gholami et al. 2019)
    ODE-ResNet-18 / ODE-SqueezeNext-23 with Euler, Nt = 2 steps per ODE block, gradient
    ``checkpointed`` (ANODE). SGD, momentum 0.9, weight decay 5e-4, learning rate 0.1, batch 256,
    350 epochs (ANODE's ``train.py``); the learning rate is divided by 10 after epochs 150 and 250
    (our documented choice: ANODE's ``lr_schedule`` is not part of its public code).

Every option can be overridden (``--lr``, ``--solver``, ``--steps``, ``--tol``, ...). Data: the python
pickle folder of CIFAR (``--data``, see :class:`pyode_bridge.data.CIFAR`; nothing is downloaded) or
``--fake-data`` (a small synthetic folder whose classes are colour patterns plus noise: learnable,
for trying the script). Augmentation: random crop with zero
padding 4 and horizontal flip, on whole batches, driven by a seeded generator.

Each epoch the test accuracy is evaluated and a row is appended to ``metrics.csv`` /
``metrics.json`` (train/test loss and accuracy, forward/backward NFE per batch, learning rate,
tolerance, time); ``training.png`` plots them.

Checkpoints (``<out>/checkpoint.pt``) are written atomically every ``--ckpt-every`` optimiser steps
and at the end of every epoch, with the model, optimiser, scheduler, epoch, global step, the
position inside the epoch, the partial epoch sums, the metrics so far and every random stream
(Python, numpy, torch CPU/CUDA, the data-order generator of the loader's sampler, the
augmentation generator; the loader draws its workers' seeds from its own generator, seeded per
epoch, not from torch's global one). ``--resume`` continues from it: a run killed mid-epoch and
resumed ends with the same parameters and metrics as an uninterrupted run with the same seed (bit
for bit on the CPU with the same thread count, also for a model that draws from torch's global
generator, such as dropout; on CUDA add ``--deterministic``). Each checkpoint carries a checksum:
``--resume`` on a damaged file stops with one line that names it ("corrupt or truncated"), and the
leftovers of a save killed mid-write are removed by the next save. ``--stop-after-steps K``
simulates such a kill: the run stops right after step ``K`` without writing anything.

Examples::

    python examples/train_cifar.py --data ~/data/cifar-10-batches-py --model odenet
    python examples/train_cifar.py --data ~/data --model resnet --sensitivity checkpointed --device cuda
    python examples/train_cifar.py --fake-data --width 8 --epochs 3 --lr 0.05 --tol 1e-3   # learns in a minute
    python examples/train_cifar.py --data ~/data --model odenet --resume     # after a crash
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    SENSITIVITY_HELP,
    add_checkpoint_args,
    add_run_args,
    format_table,
    is_adaptive,
    load_resume_checkpoint,
    parse_sensitivity,
    plt,
    positive,
    progress,
    sensitivity_arg,
    setup_run,
    solver_arg,
    sync,
    write_csv,
    write_json,
)
from torch.utils.data import DataLoader, Dataset

from pyode_bridge.data import (
    CIFAR,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFARNotFoundError,
    augment_batch,
    cifar_files,
    read_cifar_pickle,
    write_fake_cifar,
)
from pyode_bridge.models import build_model
from pyode_bridge.utils.checkpoint import (
    ResumableBatchSampler,
    atomic_save,
    capture_rng_state,
    restore_rng_state,
)

SCRIPT = "train_cifar"
CHECKPOINT = "checkpoint.pt"
FORMAT = 1

#: The papers' recipes (see the module docstring); ``None`` options of the command line take these.
RECIPES = {
    "odenet": dict(lr=5e-3, weight_decay=1e-5, batch_size=100, epochs=300, milestones=[],
                   solver="dopri5", steps=None, tol=1e-5, tol_decay_every=150, sensitivity="interpolated"),
    "resnet": dict(lr=0.1, weight_decay=5e-4, batch_size=256, epochs=350, milestones=[150, 250],
                   solver="euler", steps=2, tol=1e-3, tol_decay_every=0, sensitivity="checkpointed"),
    "sqnxt": dict(lr=0.1, weight_decay=5e-4, batch_size=256, epochs=350, milestones=[150, 250],
                  solver="euler", steps=2, tol=1e-3, tol_decay_every=0, sensitivity="checkpointed"),
}
#: Options whose change makes a checkpoint meaningless for ``--resume``.
#: ``--fake-data``: training and test images.
FAKE_SIZES = (500, 200)
_MUST_MATCH = ("model", "num_classes", "width", "width_x", "stages", "seed", "batch_size", "solver",
               "steps", "sensitivity")


class BatchView(Dataset):
    """Indexable by a list of indices: one tensor gather per batch instead of one item at a time
    (for ``DataLoader(..., sampler=ResumableBatchSampler, batch_size=None)``)."""

    def __init__(self, data: torch.Tensor, targets: torch.Tensor):
        self.data, self.targets = data, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.data[idx], self.targets[idx]


def fill_recipe(args) -> None:
    """Replace ``None`` options with the model's recipe and validate ``--sensitivity``."""
    for k, v in RECIPES[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # The canonical label ("interpolated" -> "interpolated:16"): what --resume compares. A spec given
    # on the command line is one already (sensitivity_arg); the recipe's is made one here.
    args.sensitivity = parse_sensitivity(args.sensitivity)[0]


def write_learnable_fake_cifar(root, num_classes: int, n_train: int, n_test: int, seed: int) -> Path:
    """A small synthetic CIFAR folder (the real pickle format, :func:`write_fake_cifar`) whose
    images can be learned: each class has its own colour and coarse 4x4 pattern (8x8-pixel blocks),
    and every image is its class's pattern plus Gaussian pixel noise (std 30 of 255). The colour
    survives the crop/flip augmentation, so a few steps of training beat chance (1/num_classes).

    Returns:
        The batch folder, ``root/cifar-10-batches-py`` (``cifar-100-python``).
    """
    folder = write_fake_cifar(root, num_classes=num_classes, n_train=n_train, n_test=n_test, seed=seed)
    rng = np.random.RandomState(seed)
    colour = rng.uniform(40, 215, size=(num_classes, 3, 1, 1))
    blocks = np.kron(rng.uniform(-35, 35, size=(num_classes, 3, 4, 4)), np.ones((1, 1, 8, 8)))
    patterns = colour + blocks  # (classes, 3, 32, 32)
    files = cifar_files(num_classes)
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    for name in files["train"] + files["test"]:
        batch = read_cifar_pickle(folder / name)
        labels = np.asarray(batch[label_key])
        x = patterns[labels] + rng.normal(0.0, 30.0, size=(len(labels), 3, 32, 32))
        # CIFAR rows are channel-major (1024 red, 1024 green, 1024 blue); 0 is kept for crop padding.
        batch[b"data"] = np.clip(np.rint(x), 1, 255).astype(np.uint8).reshape(len(labels), 3072)
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder


def load_cifar(args, root) -> tuple:
    """Train and test sets from ``root``; a missing or incomplete folder is a one-line exit that
    names ``--data`` and ``--fake-data`` (not the library's ``root=``), and so is a damaged file or one
    that would run code when unpickled (refused, not run)."""
    try:
        return tuple(CIFAR(root, train=train, num_classes=args.num_classes, augment=False, normalize=False)
                     for train in (True, False))
    except CIFARNotFoundError as e:
        what = str(e).split("; pass root=")[0]  # the library's message minus its own argument name
        if not Path(args.data).expanduser().exists() and "Expected" in what:
            what = "no such folder. " + what[what.index("Expected"):]  # not a list of every missing file
        raise SystemExit(f"--data {args.data}: {what}. Point --data DIR at that folder or at its parent, or "
                         "try the script without CIFAR: --fake-data (a small synthetic set)") from None
    except ValueError as e:  # a file that is not a CIFAR batch, is damaged, or would run code when unpickled
        raise SystemExit(f"--data {args.data}: {e}") from None


def build(args, device):
    """Model, optimiser and scheduler for ``args`` (parameters initialised from ``--seed``)."""
    torch.manual_seed(args.seed)
    _, sens = parse_sensitivity(args.sensitivity)
    kw = dict(method=args.solver, rtol=args.tol, atol=args.tol, sensitivity=sens)
    if args.model == "odenet":
        model = build_model("odenet", args.num_classes, width=args.width or 64, steps=args.steps or 2, **kw)
    elif args.model == "resnet":
        model = build_model("resnet", args.num_classes, width=args.width or 64, num_stages=args.stages or 4,
                            steps=args.steps or 2, **kw)
    else:
        model = build_model("sqnxt", args.num_classes, width_x=args.width_x, steps=args.steps or 2, **kw)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(args.milestones), gamma=0.1)
    return model, opt, sched


def tolerance(args, epoch: int) -> float:
    """IRDM: the tolerance is divided by 10 after every ``tol_decay_every`` epochs."""
    if args.tol_decay_every and args.tol_decay_every > 0:
        return args.tol / 10 ** (epoch // args.tol_decay_every)
    return args.tol


def set_tolerance(model, tol: float) -> None:
    for block in model.ode_blocks():
        block.rtol = block.atol = tol


def prepare(raw: torch.Tensor, mean, std, device, augment: bool, generator) -> torch.Tensor:
    """uint8 ``(B, 3, 32, 32)`` -> normalised float on ``device``; augmentation before normalising so
    that the crop padding is black, as in torchvision's recipe."""
    x = raw.to(device, non_blocking=True).float().div_(255.0)
    if augment:
        x = augment_batch(x, 4, generator)
    return (x - mean) / std


@torch.no_grad()
def evaluate(model, data, targets, mean, std, device, batch_size: int, limit: int | None) -> dict:
    """Test loss, accuracy and forward NFE per batch (``model.eval()``: BatchNorm running statistics)."""
    model.eval()
    loss = correct = seen = nfe = batches = 0
    for i in range(0, len(targets), batch_size):
        if limit is not None and batches >= limit:
            break
        x = prepare(data[i:i + batch_size], mean, std, device, False, None)
        y = targets[i:i + batch_size].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        nfe += model.nfe
        batches += 1
    return {"test_loss": loss / max(seen, 1), "test_acc": correct / max(seen, 1),
            "test_nfe": nfe / max(batches, 1)}


def _fresh_sums() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "nfe_forward": 0, "nfe_backward": 0, "batches": 0,
            "time_s": 0.0}


def save(path, model, opt, sched, sampler, generators, state, args) -> None:
    """The checkpoint: everything that determines the rest of the run."""
    atomic_save({
        "format": FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "epoch": state["epoch"], "global_step": state["global_step"],
        "batches_done": state["batches_done"], "sums": dict(state["sums"]),
        "history": list(state["history"]), "sampler": sampler.state_dict(state["batches_done"]),
        "rng": capture_rng_state(generators), "args": {k: v for k, v in vars(args).items()},
    }, path)


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''} per ODE block"


def plot_history(history: list, path) -> None:
    pyplot = plt()
    from matplotlib.ticker import MaxNLocator
    ep = [h["epoch"] for h in history]
    fig, axes = pyplot.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    axes[0].set_title("cross-entropy")
    axes[1].plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    axes[1].plot(ep, [h["test_acc"] for h in history], "o-", label="test")
    axes[1].set_title("accuracy")
    axes[2].plot(ep, [h["nfe_forward"] for h in history], "o-", label="forward")
    axes[2].plot(ep, [h["nfe_backward"] for h in history], "o-", label="backward")
    axes[2].set_title("NFE per training batch")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_cifar.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="CIFAR pickle folder (cifar-10-batches-py / cifar-100-python) "
                                                "or its parent")
    d.add_argument("--fake-data", action="store_true",
                   help="write a small synthetic CIFAR folder under --out (500 train / 200 test images, each "
                        "class a colour pattern plus noise: learnable) and train on it, to try the script")
    d.add_argument("--num-classes", type=int, choices=[10, 100], default=10)
    d.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    d.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=sorted(RECIPES), default="odenet")
    m.add_argument("--width", type=positive(int), default=None, help="odenet/resnet channels (default 64)")
    m.add_argument("--width-x", type=positive(float), default=1.0, help="sqnxt width multiplier (default 1.0)")
    m.add_argument("--stages", type=positive(int), default=None, help="resnet stages (default 4)")
    m.add_argument("--sensitivity", type=sensitivity_arg, default=None,
                   help=f"{SENSITIVITY_HELP} (default: interpolated for odenet, checkpointed for resnet/sqnxt)")
    m.add_argument("--solver", type=solver_arg, default=None,
                   help="ODE solver (default: dopri5 odenet, euler resnet/sqnxt)")
    m.add_argument("--steps", type=positive(int), default=None,
                   help="fixed-step solvers (euler, midpoint, rk4, ...): steps per ODE block (default 2)")
    m.add_argument("--tol", type=positive(float), default=None,
                   help="rtol = atol of adaptive solvers (odenet default 1e-5)")
    m.add_argument("--tol-decay-every", type=int, default=None,
                   help="divide the tolerance by 10 after every N epochs (odenet default 150; 0: never)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=positive(int), default=None, help="default 300 (odenet) / 350 (resnet, sqnxt)")
    o.add_argument("--batch-size", type=positive(int), default=None, help="default 100 (odenet) / 256 (resnet, sqnxt)")
    o.add_argument("--lr", type=positive(float), default=None, help="default 5e-3 (odenet) / 0.1 (resnet, sqnxt)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=None, help="default 1e-5 (odenet) / 5e-4 (resnet, sqnxt)")
    o.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="epochs after which the learning rate is divided by 10 (default: none for odenet, "
                        "150 250 for resnet/sqnxt)")
    o.add_argument("--limit-batches", type=positive(int), default=None, help="at most N training batches per epoch")
    o.add_argument("--limit-test-batches", type=positive(int), default=None,
                   help="at most N test batches per evaluation")
    o.add_argument("--test-batch-size", type=positive(int), default=500)
    c = add_checkpoint_args(p, 200, "optimiser steps", "after every epoch")
    c.add_argument("--deterministic", action="store_true",
                   help="CUDA: deterministic cuDNN / algorithms, for bit-identical resumed runs")
    add_run_args(p, SCRIPT)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options in ``argv`` (default ``sys.argv[1:]``)."""
    return _parser().parse_args(sys.argv[1:] if argv is None else argv)


def main(argv=None) -> dict:
    """Train (or resume) as ``argv`` says (default ``sys.argv[1:]``).

    Returns:
        ``{"history": [per-epoch metrics], "final": last row or None, "global_step", "epoch",
        "stopped": True if --stop-after-steps ended the run, "checkpoint": path}``.
    """
    args = parse_args(argv)
    fill_recipe(args)
    if args.data is None and not args.fake_data:
        raise SystemExit("give --data DIR (a CIFAR python-pickle folder) or --fake-data")
    device, out = setup_run(args)
    if args.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    root = args.data
    if args.fake_data:
        root = write_learnable_fake_cifar(out / "fake_cifar", args.num_classes, FAKE_SIZES[0], FAKE_SIZES[1],
                                          args.seed)
    train_set, test_set = load_cifar(args, root)
    mean_, std_ = (CIFAR10_MEAN, CIFAR10_STD) if args.num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    mean = torch.tensor(mean_, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_, device=device).view(1, 3, 1, 1)

    model, opt, sched = build(args, device)
    # Separate streams: the data order and the augmentation each have their own generator, so the
    # two are reproducible independently of whatever else draws random numbers. The order
    # generator's state is the sampler's (it must be the one from the start of the interrupted
    # epoch, not the current one), so it is not among the generators restored with the RNG state.
    order_gen = torch.Generator().manual_seed(args.seed)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    generators = {"augment": aug_gen}
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, generator=order_gen, shuffle=True)
    # The loader's own generator, reseeded every epoch: iter(loader) draws its workers' base seed from
    # it, where it would otherwise draw from torch's global generator, once more in a resumed epoch than
    # in an uninterrupted one (and a model that draws from the global generator would then diverge).
    loader = DataLoader(BatchView(train_set.data, train_set.targets), sampler=sampler, batch_size=None,
                        num_workers=args.workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    state = {"epoch": 0, "global_step": 0, "batches_done": 0, "sums": _fresh_sums(), "history": []}
    ckpt_path = out / CHECKPOINT

    src, ck = load_resume_checkpoint(args, ckpt_path, FORMAT, _MUST_MATCH)
    if src is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        try:
            sampler.load_state_dict(ck["sampler"])
        except ValueError as e:  # another training set (a different --data or --fake-data)
            raise SystemExit(f"--resume: {src}: {e}") from None
        state.update(epoch=ck["epoch"], global_step=ck["global_step"], batches_done=ck["batches_done"],
                     sums=dict(ck["sums"]), history=list(ck["history"]))
        # Last: building the model above drew from torch's generator.
        restore_rng_state(ck["rng"], generators)
        print(f"resumed from {src}: epoch {state['epoch'] + 1}, batch {state['batches_done']}, "
              f"global step {state['global_step']}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train_cifar] {args.model} ({n_params:,} parameters), {args.sensitivity}, {args.solver}"
          f" {f'tol {args.tol:g}' if is_adaptive(args.solver) else _steps(args.steps or 2)}, "
          f"{len(train_set)} train / {len(test_set)} test images, batch {args.batch_size}, lr {args.lr:g}, "
          f"wd {args.weight_decay:g}, {args.epochs} epochs, device {device}")

    per_epoch = len(sampler) if args.limit_batches is None else min(len(sampler), args.limit_batches)
    stopped = False
    for epoch in range(state["epoch"], args.epochs):
        state["epoch"] = epoch
        tol = tolerance(args, epoch)
        set_tolerance(model, tol)
        model.train()
        sums = state["sums"]
        bar = progress(total=per_epoch, initial=state["batches_done"], desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=args.no_progress, leave=False)
        loader.generator.manual_seed(args.seed * 100_003 + epoch)
        for raw, y in loader:
            if state["batches_done"] >= per_epoch:
                break
            sync(device)
            t0 = time.perf_counter()
            x = prepare(raw, mean, std, device, not args.no_augment, aug_gen)
            y = y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stats = model.ode_stats()
            sync(device)
            sums["time_s"] += time.perf_counter() - t0
            sums["loss"] += loss.item() * len(y)
            sums["correct"] += (logits.argmax(1) == y).sum().item()
            sums["seen"] += len(y)
            sums["nfe_forward"] += stats.nfe_forward
            sums["nfe_backward"] += stats.nfe_backward
            sums["batches"] += 1
            state["batches_done"] += 1
            state["global_step"] += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", nfe=f"{stats.nfe_forward}/{stats.nfe_backward}")
            if args.ckpt_every and state["global_step"] % args.ckpt_every == 0:
                save(ckpt_path, model, opt, sched, sampler, generators, state, args)
            if args.stop_after_steps is not None and state["global_step"] >= args.stop_after_steps:
                stopped = True
                break
        bar.close()
        if stopped:
            print(f"--stop-after-steps {args.stop_after_steps}: stopping at global step {state['global_step']} "
                  "without a checkpoint (as if killed)")
            break
        test = evaluate(model, test_set.data, test_set.targets, mean, std, device, args.test_batch_size,
                        args.limit_test_batches)
        b = max(sums["batches"], 1)
        row = {"epoch": epoch + 1, "global_step": state["global_step"], "lr": opt.param_groups[0]["lr"], "tol": tol,
               "train_loss": sums["loss"] / max(sums["seen"], 1), "train_acc": sums["correct"] / max(sums["seen"], 1),
               **test, "nfe_forward": sums["nfe_forward"] / b, "nfe_backward": sums["nfe_backward"] / b,
               "train_time_s": sums["time_s"]}
        state["history"].append(row)
        print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | test loss "
              f"{row['test_loss']:.4f} acc {row['test_acc']:.4f} | NFE f/b {row['nfe_forward']:.1f}/"
              f"{row['nfe_backward']:.1f} | {row['train_time_s']:.1f} s")
        sched.step()
        state.update(epoch=epoch + 1, batches_done=0, sums=_fresh_sums())
        save(ckpt_path, model, opt, sched, sampler, generators, state, args)
        write_csv(out / "metrics.csv", state["history"])
        write_json(out / "metrics.json", {"args": vars(args), "history": state["history"]})

    history = state["history"]
    if history and not stopped:
        plot_history(history, out / "training.png")
        cols = ["epoch", "lr", "tol", "train_loss", "train_acc", "test_loss", "test_acc", "nfe_forward",
                "nfe_backward", "train_time_s"]
        if not is_adaptive(args.solver):
            cols.remove("tol")  # a fixed-step solver has none (its --steps is in the header)
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else v
        print(format_table([{k: fmt(h[k]) for k in cols} for h in history], cols))
    return {"history": history, "final": history[-1] if history else None, "global_step": state["global_step"],
            "epoch": state["epoch"], "stopped": stopped, "checkpoint": str(ckpt_path)}


if __name__ == "__main__":
    main()
