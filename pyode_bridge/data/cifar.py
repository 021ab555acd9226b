"""CIFAR-10 / CIFAR-100 from a local folder in the python-pickle batch format, without torchvision.

Expected layout (what ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html unpack to)::

    cifar-10-batches-py/   data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/      train, test, meta

Each batch file is a pickled dict with ``b"data"`` (uint8, ``(N, 3072)``, the red, green and blue
32x32 planes in row-major order) and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
Nothing is downloaded: :class:`CIFAR` reads the folder or raises :class:`CIFARNotFoundError` naming
the missing files. The files are read with a restricted unpickler (:func:`read_cifar_pickle`) that
rebuilds only what this format holds, so a tampered file cannot run code (``pickle.load``, and
torchvision's loader, would run whatever the file names). :func:`write_fake_cifar` writes a tiny
folder in exactly this format for tests.

Augmentation (random crop with zero padding 4, horizontal flip with probability 1/2, the standard
CIFAR recipe) is implemented in torch and can be driven by a ``torch.Generator``; it is also
available on whole batches (:func:`augment_batch`) for training loops that keep the data on the GPU.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CIFAR", "CIFARNotFoundError", "write_fake_cifar", "read_cifar_pickle", "cifar_files", "random_crop",
           "random_hflip", "augment_batch", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD"]

#: Per-channel mean and standard deviation of the CIFAR-10 training images (pixels in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: Per-channel mean and standard deviation of the CIFAR-100 training images (pixels in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_LAYOUT = {
    10: {"folder": "cifar-10-batches-py",
         "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
         "meta": "batches.meta", "label_key": "labels", "names_key": "label_names",
         "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"},
    100: {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
          "label_key": "fine_labels", "names_key": "fine_label_names",
          "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"},
}


class CIFARNotFoundError(FileNotFoundError):
    """The CIFAR folder is missing or incomplete; the message names every expected file."""


def cifar_files(num_classes: int = 10) -> dict:
    """The expected folder name and file names: ``{"folder", "train", "test", "meta"}``."""
    lay = _layout(num_classes)
    return {"folder": lay["folder"], "train": list(lay["train"]), "test": list(lay["test"]),
            "meta": lay["meta"]}


def _layout(num_classes):
    if num_classes not in _LAYOUT:
        raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
    return _LAYOUT[num_classes]


def _resolve_folder(root, num_classes, train) -> Path:
    """The batch folder: ``root`` itself or ``root/<folder>``; raises if files are missing."""
    lay = _layout(num_classes)
    root = Path(os.path.expanduser(os.fspath(root)))
    needed = lay["train" if train else "test"] + [lay["meta"]]
    candidates = [root / lay["folder"], root] if root.name != lay["folder"] else [root]
    for folder in candidates:
        if folder.is_dir() and all((folder / f).is_file() for f in needed):
            return folder
    # Report against the most plausible folder: the one that has some of the files, else root/<folder>.
    folder = next((c for c in candidates if c.is_dir() and any((c / f).is_file() for f in needed)),
                  candidates[0])
    missing = [str(folder / f) for f in needed if not (folder / f).is_file()]
    raise CIFARNotFoundError(
        f"CIFAR-{num_classes} {'training' if train else 'test'} data not found: missing "
        f"{', '.join(missing)}. Expected the folder '{lay['folder']}' (as unpacked from "
        f"{lay['url']}) containing {', '.join(lay['train'] + lay['test'] + [lay['meta']])}; pass "
        "root= pointing at that folder or at its parent.")


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a CIFAR file does not hold (the message says what)."""


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as a protocol-2 pickle written by Python 3 uses it for ``bytes``; only
    the ``latin1`` round trip is admitted (other codecs have no place in a CIFAR file)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"it asks for _codecs.encode with {type(text).__name__} and encoding "
                                     f"{encoding!r} (only latin1-encoded bytes are expected)")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``, as a protocol-2 pickle written by Python 3 stores ``b""``; nothing else (``bytes(n)``
    would allocate ``n`` bytes)."""
    if args:
        raise _Refused(f"it asks for bytes{args!r} (only bytes() is expected)")
    return b""


def _plain_dtype(obj, align=False, copy=True):
    """``numpy.dtype`` for the unpickler: numbers only (an object dtype would hold arbitrary objects).
    Always a new instance (``copy=True`` whatever the file says), so that the BUILD state that
    follows in the pickle never applies to one of numpy's shared dtypes."""
    dt = np.dtype(obj, align=bool(align), copy=True)
    if dt.hasobject:
        raise _Refused(f"it asks for a numpy array of dtype {dt} (Python objects)")
    if dt.itemsize == 0:  # any number of such items takes no bytes of the file, and converting them does
        raise _Refused(f"it asks for a numpy array of dtype {dt} (items of zero bytes)")
    return dt


class _NDArrayName:
    """What the name ``numpy.ndarray`` unpickles to: a token that :func:`_reconstruct` accepts as its
    first argument, and nothing else. The class itself is not handed out because a pickle can call
    what it imports, and ``ndarray(shape, "O", buffer)`` is an array of raw pointers read from the
    file's bytes (touching it dereferences them), ``ndarray(shape, "u1")`` gigabytes of memory the
    file does not hold."""

    __slots__ = ()  # a BUILD on it has nothing to set

    def __call__(self, *args):
        raise _Refused(f"it calls numpy.ndarray{args!r:.80} (numpy's pickles call _reconstruct)")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NDArrayName()
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_SCALAR = np.float64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` as its pickles use it: an empty ``ndarray`` that the BUILD state
    which follows fills from the file's bytes (so the file's size bounds the memory it takes)."""
    if subtype is not _NDARRAY:
        raise _Refused(f"it asks for numpy's _reconstruct of {subtype!r:.80} (only numpy.ndarray is expected)")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
            and 0 in shape):
        raise _Refused(f"it asks numpy's _reconstruct for an array of shape {shape!r:.80} (numpy writes an "
                       "empty one, filled by the data that follow)")
    return _RECONSTRUCT(np.ndarray, shape, _plain_dtype(dtype))


def _scalar(dtype, *obj):
    """numpy's ``scalar`` reconstructor, for dtypes of numbers only (an object dtype's scalar would be
    a pointer read from the file's bytes)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused(f"it asks for a numpy scalar of dtype {dtype!r:.80}")
    return _SCALAR(dtype, *obj)


def _frombuffer(buf, dtype, *shape_order):
    """numpy's protocol-5 array reconstructor, for dtypes of numbers only."""
    return _FROMBUFFER(buf, _plain_dtype(dtype), *shape_order)


_NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1.x / 2.x names of the same functions
#: Everything a CIFAR batch's pickle may import: numpy's array, dtype and scalar reconstructors (in
#: the protocol 2 form of the originals and the protocol 5 form of numpy >= 1.16) and the ``bytes``
#: encoder (and ``b""``) of protocol-2 pickles written by Python 3. Lists, dicts, str, bytes and numbers need no
#: import.
_ALLOWED_GLOBALS = {
    **{(f"{core}.multiarray", "_reconstruct"): _reconstruct for core in _NUMPY_CORE},
    **{(f"{core}.multiarray", "scalar"): _scalar for core in _NUMPY_CORE},
    **{(f"{core}.numeric", "_frombuffer"): _frombuffer for core in _NUMPY_CORE},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


def _build_dtype(dt: np.dtype, state) -> None:
    """The BUILD of a dtype: numpy's state ``(version, byte order, subarray, names, fields, itemsize,
    alignment, flags[, metadata])`` can declare fields of any type and set the has-object flags on
    a dtype of raw bytes; a CIFAR file's dtypes have no subarray, names or fields."""
    if not (isinstance(state, tuple) and len(state) >= 5 and state[2:5] == (None, None, None)
            and (len(state) < 8 or state[7] == dt.flags)):
        raise _Refused(f"it asks for a numpy dtype with the state {state!r:.200} (subarrays, fields or flags)")
    dt.__setstate__(state)  # type: ignore[attr-defined]  # pickle's BUILD hook; numpy's stubs omit it
    if dt.hasobject or dt.names is not None or dt.subdtype is not None or dt.itemsize == 0:
        raise _Refused(f"it asks for a numpy dtype {dt} with the state {state!r:.200}")


def _build_array(arr: np.ndarray, state) -> None:
    """The BUILD of an array: numpy's state ``([version,] shape, dtype, is_fortran, data)``, whose
    dtype must hold numbers and whose data must be bytes (numpy checks their length)."""
    if not (isinstance(state, tuple) and len(state) in (4, 5) and isinstance(state[-3], np.dtype)
            and not state[-3].hasobject and isinstance(state[-1], (bytes, bytearray, str))):
        raise _Refused(f"it asks for a numpy array with the state {state!r:.200}")
    arr.__setstate__(state)


class _CIFARUnpickler(pickle._Unpickler):
    """An unpickler that builds dicts, lists, bytes, str, numbers and numpy arrays and imports
    nothing else: a pickle can name any callable (``os.system``, ``builtins.eval``) and have it
    called while loading, and CIFAR folders are downloaded, shared and mirrored.

    It is Python's own unpickler (the pure-Python one, whose opcodes can be overridden) with
    BUILD restricted to the dtypes and arrays that numpy's reconstructors return (BUILD calls
    ``__setstate__`` or sets attributes, e.g. of an admitted function), and without the opcodes
    that instantiate classes (INST, OBJ, NEWOBJ, NEWOBJ_EX), look up extensions (EXT*) or
    persistent ids: the CIFAR format uses none of them."""

    # Handlers of this class (the stub types pickle's table for the base class's methods only).
    dispatch: ClassVar[dict[int, Callable[..., Any]]] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"it asks for the Python object {module}.{name}") from None

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.dtype):
            _build_dtype(inst, state)
        elif type(inst) is np.ndarray:
            _build_array(inst, state)
        else:
            raise _Refused(f"it asks to set the state of {inst!r:.80} (only numpy dtypes and arrays have one)")

    dispatch[pickle.BUILD[0]] = load_build


def _refuse_opcode(name):
    def load(self):
        raise _Refused(f"it uses the pickle opcode {name}, which creates objects of classes")
    return load


for _op in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"):
    _CIFARUnpickler.dispatch[getattr(pickle, _op)[0]] = _refuse_opcode(_op)


def read_cifar_pickle(path) -> dict:
    """Read one file of a CIFAR python-pickle folder (a batch or the meta file) without running
    code from it.

    Only what the CIFAR format holds is rebuilt: dicts, lists, tuples, bytes, str, numbers and
    numpy arrays of numbers. A file that asks the unpickler for anything else (a function such as
    ``os.system``, a class, an object array) is refused before that object is created, so a
    tampered file cannot run code.

    Args:
        path: the file.

    Returns:
        The dictionary as stored: keys as in the file (``bytes`` in the original CIFAR files, read
        with ``encoding="bytes"``), e.g. ``b"data"`` uint8 ``(N, 3072)`` and ``b"labels"``.

    Raises:
        ValueError: the file asks for anything else, is not a pickle of a dict, or is truncated;
            the message names the file and why.
    """
    path = Path(path)
    try:
        # From memory: a length field in the stream then cannot make a file read allocate more than
        # the file holds (a BufferedReader allocates the requested size before it reads).
        obj = _CIFARUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except _Refused as e:
        raise ValueError(f"{path}: refused to unpickle: {e}, which a CIFAR file never contains (it holds "
                         "only dicts, lists, bytes, str, numbers and numpy arrays). Loading it with pickle "
                         "could run code: replace the file with one from the original archive.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError, struct.error) as e:
        # What a damaged or foreign stream raises inside the unpickler or numpy's reconstructors.
        raise ValueError(f"{path} is not a readable CIFAR pickle (corrupt or truncated: "
                         f"{type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR file: it holds a {type(obj).__name__}, not a dict")
    return obj


def _unpickle(path: Path) -> dict:
    d = read_cifar_pickle(path)
    # Accept both bytes keys (the originals, loaded with encoding="bytes") and str keys.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_batches(folder: Path, files, label_key):
    xs, ys = [], []
    for f in files:
        d = _unpickle(folder / f)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{folder / f} is not a CIFAR batch: it lacks the key "
                             f"{'data' if 'data' not in d else label_key!r} (has {sorted(d)})")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{folder / f}: 'data' must have shape (N, 3072), got {data.shape}")
        try:
            labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / f}: {label_key!r} must be integers: {e}") from None
        if len(labels) != len(data):
            raise ValueError(f"{folder / f}: {len(data)} images but {len(labels)} labels")
        xs.append(data)
        ys.append(labels)
    x = np.concatenate(xs).reshape(-1, 3, 32, 32)
    return torch.from_numpy(x), torch.from_numpy(np.concatenate(ys))


def random_crop(img: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None):
    """Random crop after zero padding, keeping the size: ``(..., C, H, W)`` -> same shape.

    A batch ``(B, C, H, W)`` gets one independent offset per image. Pixels shifted in from the
    border are 0 (the padding), as in ``torchvision.transforms.RandomCrop(size, padding)``.
    """
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    B, _, H, W = x.shape
    p = padding
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    gdev = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (B,), generator=generator, device=gdev).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]     # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]     # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded[batch, :, rows, cols].permute(0, 3, 1, 2)                  # (B, H, W, C) -> (B, C, H, W)
    return (out[0] if squeeze else out).contiguous()


def random_hflip(img: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None):
    """Flip left-right with probability ``p``: ``(..., C, H, W)`` -> same shape (per image)."""
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    gdev = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(x.shape[0], generator=generator, device=gdev) < p
    out = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return out[0] if squeeze else out


def augment_batch(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None):
    """The standard CIFAR augmentation (random crop with zero padding, then horizontal flip) of an
    image ``(C, H, W)`` or a batch ``(B, C, H, W)``. Apply it *before* normalising, so that the
    padding is black, as in torchvision's recipe."""
    return random_hflip(random_crop(x, padding, generator), 0.5, generator)


class CIFAR(Dataset):
    """CIFAR-10 or CIFAR-100 as a map-style dataset of ``(image, label)``.

    Args:
        root: the batch folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.
        train: the 50000 training images (else the 10000 test images).
        num_classes: 10 or 100 (CIFAR-100 fine labels).
        augment: random crop (zero padding 4) and horizontal flip; ``None`` (default) means
            ``train``.
        normalize: subtract the per-channel mean and divide by the standard deviation
            (:data:`CIFAR10_MEAN`/``STD`` or the CIFAR-100 values; or pass ``(mean, std)``);
            ``False`` leaves pixels in ``[0, 1]``.
        generator: a ``torch.Generator`` for the augmentation (reproducible epochs); default:
            torch's global RNG.
        dtype: of the returned images.

    Items: ``image`` float tensor ``(3, 32, 32)``, ``label`` int in ``[0, num_classes)``.

    Attributes:
        data: uint8 tensor ``(N, 3, 32, 32)`` of raw pixels.
        targets: int64 tensor ``(N,)``.
        classes: label names from the meta file.
        mean, std: ``(3,)`` tensors used by ``normalize`` (``None`` when not normalising).
        folder: the batch folder that was read.

    Raises:
        CIFARNotFoundError (a ``FileNotFoundError``): missing folder or files, naming each one.
        ValueError: a file that is not a CIFAR batch, is damaged, or asks the unpickler for anything
            but dicts, lists, bytes, str, numbers and numpy arrays (refused before it is built, so
            a tampered file runs no code; see :func:`read_cifar_pickle`), or ``num_classes`` not
            10/100.
    """

    def __init__(self, root, train: bool = True, num_classes: int = 10, augment: bool | None = None,
                 normalize=True, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        lay = _layout(num_classes)
        self.folder = _resolve_folder(root, num_classes, train)
        self.train, self.num_classes = train, num_classes
        self.augment = train if augment is None else bool(augment)
        self.generator, self.dtype = generator, dtype
        self.data, self.targets = _read_batches(self.folder, lay["train" if train else "test"],
                                                lay["label_key"])
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= num_classes):
            raise ValueError(f"labels in {self.folder} fall outside [0, {num_classes}); is this "
                             f"CIFAR-{num_classes}?")
        meta = _unpickle(self.folder / lay["meta"])
        names = meta.get(lay["names_key"], [])
        self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        mean: Sequence[float] | None
        std: Sequence[float] | None
        if normalize is True:
            mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        elif normalize:
            mean, std = normalize
        else:
            mean = std = None
        self.mean = None if mean is None else torch.tensor(mean, dtype=dtype)
        self.std = None if std is None else torch.tensor(std, dtype=dtype)

    def __len__(self) -> int:
        return len(self.targets)

    def _to_float(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(self.dtype) / 255.0
        if self.mean is not None and self.std is not None:  # set together
            shape = (-1, 1, 1)
            x = (x - self.mean.view(shape)) / self.std.view(shape)
        return x

    def __getitem__(self, index):
        raw = self.data[index]
        if self.augment:
            raw = augment_batch(raw, 4, self.generator)
        return self._to_float(raw), int(self.targets[index])

    def tensors(self, augment: bool = False):
        """The whole split as ``(images (N, 3, 32, 32), labels (N,))``, normalised like the items
        (augmented once if ``augment``)."""
        raw = augment_batch(self.data, 4, self.generator) if augment else self.data
        return self._to_float(raw), self.targets.clone()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[0, 1]`` ``(..., 3, H, W)`` -> the dataset's normalised scale."""
        if self.mean is None or self.std is None:  # set together
            return x
        return (x - self.mean.view(-1, 1, 1).to(x)) / self.std.view(-1, 1, 1).to(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (for plotting)."""
        if self.mean is None or self.std is None:  # set together
            return x
        return x * self.std.view(-1, 1, 1).to(x) + self.mean.view(-1, 1, 1).to(x)

    def __repr__(self) -> str:
        return (f"CIFAR{self.num_classes}(split={'train' if self.train else 'test'}, n={len(self)}, "
                f"augment={self.augment}, folder='{self.folder}')")


def write_fake_cifar(root, num_classes: int = 10, n_train: int = 50, n_test: int = 20,
                     seed: int = 0) -> Path:
    """Write a tiny CIFAR folder in the original pickle format under ``root`` (for tests and smoke
    runs of the examples) and return the batch folder's path.

    CIFAR-10: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (the
    training images split over the five batches); CIFAR-100: ``root/cifar-100-python/{train, test,
    meta}`` (with ``fine_labels`` and ``coarse_labels``). Pixels are random in ``1..255`` (never 0,
    so that crop padding is recognisable); labels cycle through the classes in a shuffled order.
    """
    lay = _layout(num_classes)
    rng = np.random.RandomState(seed)
    folder = Path(os.fspath(root)) / lay["folder"]
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n, label):
        data = rng.randint(1, 256, size=(n, 3072)).astype(np.uint8)
        labels = rng.permutation(np.arange(n) % num_classes).tolist()
        d = {b"batch_label": label.encode(), b"data": data,
             b"filenames": [f"fake_{i:05d}.png".encode() for i in range(n)]}
        if num_classes == 10:
            d[b"labels"] = labels
        else:
            d[b"fine_labels"] = labels
            d[b"coarse_labels"] = [lab // 5 for lab in labels]
        return d

    def dump(name, obj):
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    if num_classes == 10:
        sizes = [len(a) for a in np.array_split(np.arange(n_train), 5)]
        for i, n in enumerate(sizes, 1):
            dump(f"data_batch_{i}", batch(n, f"training batch {i} of 5"))
        dump("test_batch", batch(n_test, "testing batch 1 of 1"))
        dump("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                              b"num_cases_per_batch": max(sizes), b"num_vis": 3072})
    else:
        dump("train", batch(n_train, "training batch 1 of 1"))
        dump("test", batch(n_test, "testing batch 1 of 1"))
        dump("meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                      b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder
