"""Atomic, resumable training checkpoints.

A run that is killed (pre-emption, out-of-memory, Ctrl-C) in the middle of an epoch should resume
from its last checkpoint and continue exactly as an uninterrupted run with the same seed would
have. That needs three things, each provided here:

* :func:`atomic_save`: the checkpoint file is either the old one or the complete new one, never a
  torn write (temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder).
* :func:`capture_rng_state` / :func:`restore_rng_state`: every random stream the run draws from
  (Python's ``random``, numpy's global state, torch's CPU and CUDA default generators, and any
  named ``torch.Generator`` such as a data-order or augmentation generator).
* :class:`ResumableBatchSampler`: a shuffling batch sampler for ``DataLoader(..., sampler=...,
  batch_size=None)`` whose epoch order comes from its own generator and which can skip the batches
  of the current epoch that were already consumed before the checkpoint.

The state dictionaries contain tensors, lists, tuples and numbers only, so they load with
``torch.load(..., weights_only=True)`` (the default of :func:`load_checkpoint`).

Example::

    sampler = ResumableBatchSampler(len(ds), 128, generator=torch.Generator().manual_seed(0))
    ...
    atomic_save({"model": model.state_dict(), "sampler": sampler.state_dict(batches_done),
                 "rng": capture_rng_state()}, "run/checkpoint.pt")
    ...
    ckpt = load_checkpoint("run/checkpoint.pt")
    model.load_state_dict(ckpt["model"])
    sampler.load_state_dict(ckpt["sampler"])
    restore_rng_state(ckpt["rng"])
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["atomic_save", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "ResumableBatchSampler"]


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path, mode: int = 0o644) -> Path:
    """``torch.save(obj, path)`` so that ``path`` holds either its previous content or all of ``obj``.

    Writes to a temporary file in the same folder (so the final rename cannot cross file
    systems), flushes and ``fsync`` s it, renames it over ``path`` with ``os.replace`` and
    ``fsync`` s the folder. If anything fails (including ``KeyboardInterrupt``), the temporary file
    is removed and ``path`` is untouched.

    Args:
        obj: what ``torch.save`` accepts.
        path: destination file; missing parent folders are created.
        mode: permission bits of the new file (``mkstemp`` would leave it readable by the owner only).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path, map_location="cpu", weights_only: bool = True):
    """Load a checkpoint written by :func:`atomic_save`.

    Args:
        path: the checkpoint file.
        map_location: as ``torch.load`` (default ``"cpu"``: tensors are moved where they belong by
            ``load_state_dict``; generator states must be CPU byte tensors anyway).
        weights_only: restrict unpickling to tensors and plain containers (safe for files of
            unknown origin; everything this module writes qualifies).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def capture_rng_state(generators: dict | None = None) -> dict:
    """The state of every random stream a training run may draw from.

    Args:
        generators: named ``torch.Generator`` s of the run (data order, augmentation, ...), on any
            device.

    Returns:
        ``{"python", "numpy", "torch", "cuda", "generators"}``; ``"cuda"`` is ``None`` unless CUDA
        has been initialised in this process. numpy's key array is stored as a tensor so that the
        dictionary loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def restore_rng_state(state: dict, generators: dict | None = None) -> None:
    """Put back what :func:`capture_rng_state` recorded.

    Args:
        state: the recorded dictionary.
        generators: the run's named generators; each one recorded under the same name is restored.

    Raises:
        KeyError: a generator passed here has no recorded state (the checkpoint is from another
            configuration).
    """
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], np.asarray(npst["keys"].cpu().numpy(), dtype=np.uint32),
                         npst["pos"], npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i].cpu(), i)
    recorded = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in recorded:
            raise KeyError(f"the checkpoint has no state for the generator {name!r} "
                           f"(it has {sorted(recorded)})")
        g.set_state(recorded[name].cpu())


def _as_tuple(x):
    """Python's random state with its nested tuples (a round trip may have made them lists)."""
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    if isinstance(x, tuple):
        return tuple(_as_tuple(v) for v in x)
    return x


class ResumableBatchSampler(Sampler):
    """Shuffled batches of indices whose order can be resumed in the middle of an epoch.

    Use it as the sampler of a ``DataLoader`` with ``batch_size=None`` over a dataset that accepts
    a list of indices (or as ``batch_sampler=`` of an ordinary one). Each iteration (epoch) draws
    one permutation from ``generator``. The loop that consumes the batches knows how many it has
    used (a ``DataLoader`` with workers prefetches ahead), so it passes that count to
    :meth:`state_dict`.

    Args:
        n: dataset size.
        batch_size: indices per batch.
        generator: a CPU ``torch.Generator`` that fixes the order (seed it for reproducible runs);
            default: a new one seeded from torch's global generator, as ``DataLoader`` does.
        shuffle: permute each epoch (else ``0..n-1`` in order).
        drop_last: drop the last, smaller batch.

    Yields:
        Lists of ``int`` indices.

    The generator's state is part of :meth:`state_dict` (as it was at the start of the interrupted
    epoch); do not also pass the generator to :func:`restore_rng_state`, which would overwrite that
    with its state at checkpoint time and change the resumed epoch's order.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None,
                 shuffle: bool = True, drop_last: bool = False):
        if int(n) < 0 or int(batch_size) < 1:
            raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size = int(n), int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self.generator = generator
        self._epoch_start = generator.get_state()
        self._skip = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        self._epoch_start = self.generator.get_state()
        skip, self._skip = self._skip, 0
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for b in range(skip, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def state_dict(self, batches_done: int = 0) -> dict:
        """The state to resume from.

        Args:
            batches_done: batches of the current epoch already consumed (``0``: the epoch is over
                or has not begun; resuming then starts the next epoch with a fresh permutation).
        """
        if batches_done:
            return {"generator": self._epoch_start.clone(), "skip": int(batches_done)}
        return {"generator": self.generator.get_state(), "skip": 0}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration redraws the interrupted epoch's permutation and skips the
        batches already consumed."""
        self.generator.set_state(state["generator"].cpu())
        self._epoch_start = state["generator"].cpu().clone()
        self._skip = int(state["skip"])
