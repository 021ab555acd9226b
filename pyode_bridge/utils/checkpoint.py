"""Atomic, verified, resumable training checkpoints.

A run that is killed (pre-emption, out-of-memory, Ctrl-C) in the middle of an epoch should resume
from its last checkpoint and continue exactly as an uninterrupted run with the same seed would
have. That needs these things, each provided here:

* :func:`atomic_save`: the checkpoint file is either the old one or the complete new one, never a
  torn write (temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder).
  The temporary files of saves that were killed outright are removed by the next save or load,
  but never one that another process may still be writing (:func:`remove_stale_temp_files`).
* :func:`load_checkpoint`: each file carries the SHA-256 and length of its payload, checked before
  anything is unpickled; a damaged file is a :class:`CheckpointError` that names it and says
  "corrupt or truncated", never a silent load of changed numbers.
* :func:`capture_rng_state` / :func:`restore_rng_state`: every random stream the run draws from
  (Python's ``random``, numpy's global state, torch's CPU and CUDA default generators, and any
  named ``torch.Generator`` such as a data-order or augmentation generator).
* :class:`ResumableBatchSampler`: a shuffling batch sampler for ``DataLoader(..., sampler=...,
  batch_size=None)`` whose epoch order comes from its own generator and which can skip the batches
  of the current epoch that were already consumed before the checkpoint.

Give the ``DataLoader`` its own ``generator=`` too, seeded at the start of each epoch from the
epoch's number: ``iter(loader)`` otherwise draws its workers' base seed from torch's global
generator at the start of every epoch, and an epoch resumed in the middle draws it a second time,
so a model that draws from the global generator (dropout, Hutchinson noise) continues differently
from the uninterrupted run (and the workers' seeds of the resumed epoch differ).

The state dictionaries contain tensors, lists, tuples and numbers only, so they load with
``torch.load(..., weights_only=True)`` (the default of :func:`load_checkpoint`).

Example::

    sampler = ResumableBatchSampler(len(ds), 128, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, sampler=sampler, batch_size=None, generator=torch.Generator())
    ...  # on --resume:
    ckpt = load_checkpoint("run/checkpoint.pt")
    model.load_state_dict(ckpt["model"])
    sampler.load_state_dict(ckpt["sampler"])
    restore_rng_state(ckpt["rng"])
    start, skip = ckpt["epoch"], ckpt["sampler"]["skip"]
    for epoch in range(start, epochs):
        loader.generator.manual_seed(seed + epoch)  # not the global generator; the same when resumed
        for batches_done, batch in enumerate(loader, skip + 1):
            ...  # a training step; now and then:
            atomic_save({"model": model.state_dict(), "epoch": epoch,
                         "sampler": sampler.state_dict(batches_done), "rng": capture_rng_state()},
                        "run/checkpoint.pt")
        skip = 0
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import socket
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

try:
    import fcntl
except ImportError:  # Windows: temporary files are judged by process id and age only
    fcntl = None  # type: ignore[assignment]  # an optional module: None says it is missing

__all__ = ["atomic_save", "load_checkpoint", "CheckpointError", "remove_stale_temp_files", "capture_rng_state",
           "restore_rng_state", "ResumableBatchSampler"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as it was written: damaged (``"corrupt or
    truncated"``), or intact but holding what safe loading refuses. The message names the file."""


#: The first bytes of every file :func:`atomic_save` writes; then the payload's length (8 bytes,
#: little-endian) and its SHA-256 (32 bytes), then the payload: ``torch.save``'s bytes.
_MAGIC = b"pyode_bridge checkpoint v2\n"
_HEADER = len(_MAGIC) + 8 + 32
_ZIP = b"PK\x03\x04"  # what ``torch.save`` (the format before v2) writes first
#: A temporary file of another host (where its writer's process cannot be checked) is stale once it
#: has not been written to for this long; no save stalls that long between two writes.
STALE_AFTER_S = 6 * 3600.0
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"  # no dots: they delimit the name
_writing: set = set()  # this process's temporary files being written now (other threads may save)


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


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host runs; ``None`` where that cannot be asked."""
    if os.name != "posix":
        return None  # Windows' os.kill(pid, 0) would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return None
    return True


def remove_stale_temp_files(path, stale_after_s: float = STALE_AFTER_S) -> list:
    """Delete the temporary files that killed :func:`atomic_save` calls left next to ``path``.

    A save writes ``.<name>.<host>.<pid>.<random>.tmp`` and renames it over ``path``; a process
    killed mid-write leaves that file behind, possibly checkpoint-sized. A file is removed when its
    writer is known to be gone, and never while a writer may still be writing it (another rank,
    another process on a shared file system, another thread of this one):

    * a file whose ``flock`` is held is never removed: every writer holds one on its temporary
      file until it has renamed it, and the kernel drops it when the writer dies (POSIX; this
      also covers writers in other pid namespaces, e.g. containers sharing the host name, whose
      process ids the next rules would misjudge);
    * this host, another process: removed when no process with that id exists;
    * this host and this process id: removed unless this process is writing it now (a restarted
      container often gets its predecessor's process id);
    * any file of this path, including those whose writer cannot be asked (another host, the
      random ``.<name>.<random>.tmp`` of the format before v2, a system without process ids to
      check): removed once it has not been modified for ``stale_after_s`` seconds (a writer
      writes without pauses that long; a live process id may have been reused).

    :func:`atomic_save` and :func:`load_checkpoint` call this; call it yourself to clean a folder.

    Args:
        path: the checkpoint file (need not exist).
        stale_after_s: age limit for files whose writer cannot be checked.

    Returns:
        The removed files (:class:`pathlib.Path`).
    """
    path = Path(path)
    mine = re.compile(rf"\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp")
    legacy = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.tmp")
    removed: list[Path] = []
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
    except OSError:  # no folder yet, or not readable: nothing to clean
        return removed
    now = time.time()
    for tmp in candidates:
        m = mine.fullmatch(tmp.name)
        if not (m or legacy.fullmatch(tmp.name)):
            continue  # not a temporary file of this path
        here, pid = m is not None and m["host"] == _HOST, int(m["pid"]) if m else None
        if here and pid == os.getpid() and os.path.abspath(tmp) in _writing:
            continue
        try:
            lock = _try_lock(tmp)
        except FileNotFoundError:  # vanished meanwhile (its writer renamed it)
            continue
        except OSError:  # not readable (another user's): the process-id and age rules decide
            lock = None
        try:
            if lock is _HELD:
                continue  # a live writer holds it, whatever its process id says
            # here implies a match, hence a process id
            gone = (here and pid is not None and (pid == os.getpid() or _pid_alive(pid) is False)) or \
                now - tmp.stat().st_mtime >= stale_after_s
            if gone:
                tmp.unlink()  # while holding its lock: a writer that locks it now finds it gone
                removed.append(tmp)
        except OSError:  # vanished meanwhile (its writer renamed it), or not ours to delete
            pass
        finally:
            if lock is not None and lock is not _HELD:
                os.close(lock)
    return removed


_HELD = object()


def _try_lock(tmp: Path):
    """Whether a live :func:`atomic_save` is writing ``tmp``: every writer holds an exclusive
    ``flock`` on its temporary file until it has renamed it, and the kernel releases it when the
    writer dies. That holds across pid namespaces (containers sharing a host name, whose process
    ids mean nothing here), where the process-id rules cannot tell.

    Returns:
        ``_HELD`` (a writer holds it), an open descriptor holding the lock (close it after removing
        the file), or ``None`` (locks are not available here: the process-id and age rules decide).

    Raises:
        OSError: ``tmp`` cannot be opened (it vanished, or is another user's).
    """
    if fcntl is None:
        return None
    # Non-blocking and not through a link: a FIFO or a link put under such a name must not stall or
    # redirect the clean-up.
    fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return _HELD
    except OSError:  # a file system without flock
        os.close(fd)
        return None
    return fd


def _create_locked_temp(path: Path):
    """Create and lock (:func:`_try_lock`) this process's temporary file for ``path``; registered as
    being written before it exists, so that another thread's cleaning never takes it.

    Returns:
        ``(fd, name)``: the open descriptor (holding the lock where ``flock`` works) and the name.
    """
    while True:
        tmp = os.path.abspath(path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        _writing.add(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        except BaseException:
            _writing.discard(tmp)
            raise
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while a cleaner that took it first removes it
            named, opened = os.stat(tmp), os.fstat(fd)
            if (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
                return fd, tmp
        except FileNotFoundError:
            pass
        except OSError:  # a file system without flock: the process-id and age rules protect it
            return fd, tmp
        except BaseException:
            os.close(fd)
            _writing.discard(tmp)
            raise
        # A cleaner removed the name between its creation and the lock: take another one.
        os.close(fd)
        _writing.discard(tmp)


class _HashingWriter:
    """A write-only file that hashes and counts what ``torch.save`` streams into it."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def atomic_save(obj, path, mode: int = 0o644) -> Path:
    """``torch.save(obj)`` into ``path`` with a checksum, so that ``path`` holds either its previous
    content or all of ``obj``, and :func:`load_checkpoint` can tell a damaged file.

    Writes to a temporary file in the same folder (so the final rename cannot cross file
    systems), flushes and ``fsync`` s it, renames it over ``path`` with ``os.replace`` and
    ``fsync`` s the folder. If anything fails (including ``KeyboardInterrupt``), the temporary file
    is removed and ``path`` is untouched; the leftovers of a save that was killed outright are
    removed by the next save or load (:func:`remove_stale_temp_files`).

    The file is ``pyode_bridge checkpoint v2``: a short header with the length and SHA-256 of the
    payload, then ``torch.save``'s bytes. Read it with :func:`load_checkpoint` (plain ``torch.load``
    does not read it).

    Args:
        obj: what ``torch.save`` accepts; to load it with ``weights_only=True`` (the default of
            :func:`load_checkpoint`), tensors, numbers, strings and plain containers only.
        path: destination file; missing parent folders are created.
        mode: permission bits of the new file (it is created readable by the owner only, then set to ``mode``).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = _create_locked_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(bytes(_HEADER))
            payload = _HashingWriter(fh)
            torch.save(obj, payload)  # type: ignore[arg-type]  # torch.save needs only write()
            fh.seek(0)
            fh.write(_MAGIC + struct.pack("<Q", payload.size) + payload.sha.digest())
            fh.flush()
            os.fsync(fh.fileno())
            if fcntl is not None:  # renamed before closing, i.e. under its lock (Windows cannot rename an open file)
                os.chmod(tmp, mode)
                os.replace(tmp, path)
        if fcntl is None:
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        _writing.discard(tmp)
    _fsync_dir(path.parent)
    return path


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or truncated ({why}); it cannot be loaded safely. Resume from "
                           "another checkpoint or start the run again.")


def _torch_load(fh, path: Path, map_location, weights_only: bool, verified: bool):
    """``torch.load`` of the payload that starts at ``fh``'s position (torch reads a zip archive
    from the position it is given); its failures become a :class:`CheckpointError` naming ``path``
    (torch's own message would name no file, and may suggest ``weights_only=False``)."""
    try:
        return torch.load(fh, map_location=map_location, weights_only=weights_only)
    except Exception as e:
        # torch words it "Unsupported global: GLOBAL x.y" for a class it does not admit, and "unsupported
        # GLOBAL x.y whose module x is blocked" for os.system, eval, ...: the payloads that run code.
        refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path} holds an object of type {refused[1]}, which loading with weights_only=True does not "
                f"admit{' (the file is intact: its checksum matches)' if verified else ''}. Save tensors, "
                "numbers, strings and plain containers (state_dict()s) only.") from None
        if verified:  # the bytes are those written: not damage, but something torch cannot read
            # torch's message may open with the advice to load with weights_only=False: never pass it on.
            why = next((line.strip() for line in str(e).splitlines() if line.strip()
                        and "weights_only" not in line and "trust" not in line), "")
            raise CheckpointError(f"{path}: torch cannot read its (intact) payload: {type(e).__name__}: "
                                  f"{why[:300]}") from None
        raise _damaged(path, f"torch cannot read it: {type(e).__name__}") from None


def _sha256_rest(fh) -> bytes:
    """SHA-256 of ``fh`` from its position to the end, in 1 MiB pieces (no copy of the file)."""
    sha, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        sha.update(view[:n])
    return sha.digest()


def load_checkpoint(path, map_location="cpu", weights_only: bool = True):
    """Load a checkpoint written by :func:`atomic_save`, after verifying its checksum.

    Also removes the temporary files of killed saves next to ``path`` (:func:`remove_stale_temp_files`).
    A file of the format before v2 (a plain ``torch.save`` zip, without checksum) is still loaded,
    with a warning that it cannot be verified; the next :func:`atomic_save` writes v2.

    Args:
        path: the checkpoint file.
        map_location: as ``torch.load`` (default ``"cpu"``: tensors are moved where they belong by
            ``load_state_dict``; generator states must be CPU byte tensors anyway).
        weights_only: restrict unpickling to tensors and plain containers (safe for files of
            unknown origin; everything this module writes qualifies).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CheckpointError (a ``ValueError``): the file is damaged (the message names it and says
            "corrupt or truncated": a wrong checksum, a length that does not match, an unknown
            header), or holds objects that ``weights_only=True`` refuses.
    """
    path = Path(path)
    remove_stale_temp_files(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # One open file for the check and the load: a save that replaces path meanwhile renames another
    # file over the name and leaves these bytes alone.
    with open(path, "rb") as fh:
        head = fh.read(_HEADER)
        if head.startswith(_ZIP):
            warnings.warn(f"{path} was written by an older atomic_save without a checksum, so damage to it cannot "
                          "be detected; loading it with weights_only=True. The next atomic_save writes the "
                          "checksummed format.", UserWarning, stacklevel=2)
            fh.seek(0)
            return _torch_load(fh, path, map_location, weights_only, verified=False)
        size_on_disk = os.fstat(fh.fileno()).st_size
        if not head.startswith(_MAGIC):
            raise _damaged(path, f"{size_on_disk} bytes that do not begin with the header of a "
                                 f"{_MAGIC.decode().strip()} file, nor are a torch.save zip")
        if len(head) < _HEADER:
            raise _damaged(path, f"{size_on_disk} bytes, shorter than the {_HEADER}-byte header")
        (size,) = struct.unpack("<Q", head[len(_MAGIC):len(_MAGIC) + 8])
        if size_on_disk - _HEADER != size:
            raise _damaged(path, f"the header announces {size} bytes of payload, the file holds "
                                 f"{size_on_disk - _HEADER}")
        if _sha256_rest(fh) != head[len(_MAGIC) + 8:]:
            raise _damaged(path, "the SHA-256 of its payload differs from the one written with it")
        fh.seek(_HEADER)
        return _torch_load(fh, path, map_location, weights_only, verified=True)


def _numpy_state(state: tuple) -> dict:
    """A ``RandomState.get_state()`` tuple as a dictionary that loads with ``weights_only=True``
    (the key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_tuple(state: dict) -> tuple:
    """Inverse of :func:`_numpy_state`."""
    return (state["kind"], np.asarray(state["keys"].cpu().numpy(), dtype=np.uint32), state["pos"],
            state["has_gauss"], state["cached"])


def capture_rng_state(generators: dict | None = None) -> dict:
    """The state of every random stream a training run may draw from.

    Args:
        generators: named ``torch.Generator`` s (on any device) or ``numpy.random.RandomState`` s
            of the run (data order, augmentation, data sampling, ...).

    Returns:
        ``{"python", "numpy", "torch", "cuda", "generators"}``; ``"cuda"`` is ``None`` unless CUDA
        has been initialised in this process. numpy's key arrays are stored as tensors so that the
        dictionary loads with ``weights_only=True``.
    """
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": random.getstate(),
        # numpy's stub types get_state() as get_state(legacy=False), a dict; the default is
        # legacy=True, the tuple _numpy_state takes.
        "numpy": _numpy_state(np.random.get_state()),  # type: ignore[arg-type]
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": {name: _numpy_state(g.get_state())  # type: ignore[arg-type]  # as above
                       if isinstance(g, np.random.RandomState) else g.get_state()
                       for name, g in (generators or {}).items()},
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
    np.random.set_state(_numpy_tuple(state["numpy"]))
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
        if isinstance(g, np.random.RandomState):
            g.set_state(_numpy_tuple(recorded[name]))
        else:
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
        # n and batch_size: the permutation and the count of batches mean nothing for another data set.
        shape = {"n": self.n, "batch_size": self.batch_size}
        if batches_done:
            return {"generator": self._epoch_start.clone(), "skip": int(batches_done), **shape}
        return {"generator": self.generator.get_state(), "skip": 0, **shape}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration redraws the interrupted epoch's permutation and skips the
        batches already consumed.

        Raises:
            ValueError: ``state`` is of a sampler with another ``n`` or ``batch_size`` (a checkpoint
                of another data set: it would resume at a position of another epoch).
        """
        for key, here in (("n", self.n), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != here:  # states written before they were recorded pass
                raise ValueError(f"the sampler state is of {key}={int(state[key])}, this sampler has {key}={here}: "
                                 "it was saved for another data set or batch size, whose position in the "
                                 "epoch means nothing here")
        self.generator.set_state(state["generator"].cpu())
        self._epoch_start = state["generator"].cpu().clone()
        self._skip = int(state["skip"])
