"""Tensors across the Python/Julia boundary, without copies where the solver allows it.

CPU: a contiguous tensor is handed to Julia as ``tensor.numpy()`` (same memory), which juliacall
passes to Julia functions as a ``PyArray`` (no copy); a Julia array reaches Python as a
``juliacall.ArrayValue`` exposing the NumPy array interface, read with ``np.asarray`` and
``torch.from_numpy`` (no copy). Julia matrices are column-major: an ``N x T`` Julia matrix is a
``(T, N)`` C-contiguous tensor after ``.T``.

CUDA: tensors go to Julia inside a :class:`CudaCarrier` (the device pointer, the size and the
dtype; it keeps the tensor alive for the call), and Julia copies the memory at once into a
``CuArray`` it owns. Julia's CUDA arrays reach Python through :func:`cuda_view`: a torch tensor
made from the raw device pointer with ``__cuda_array_interface__``, dimensions reversed like a
DLPack export (undone by :func:`julia_view`). That tensor holds no reference into Julia (Julia
keeps the ``CuArray`` alive in per-solve storage until the callback returns), so torch freeing it,
from whatever thread, never runs Julia code. Torch and CUDA.jl use different streams: before Julia
reads torch's memory, :func:`sync` waits for torch's current stream; Julia waits for its own
before Python reads Julia's (``PyodeBridge.sync_device``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["CudaCarrier", "cuda_interface", "cuda_view", "vector_to_julia", "matrix_to_julia",
           "julia_view", "write", "matrix_from_julia", "sync"]

_FLOATS = (torch.float32, torch.float64)
_TYPESTR = {torch.float32: "<f4", torch.float64: "<f8"}
_DTYPE = {v: k for k, v in _TYPESTR.items()}


class CudaCarrier:
    """A contiguous CUDA tensor offered to Julia by its device pointer.

    Attributes read by the Julia side: ``ptr`` (int), ``numel``, ``typestr`` (``"<f4"``/``"<f8"``);
    ``tensor`` keeps the memory alive while Julia copies it. No ``__array__`` (juliacall would
    otherwise try to read it as a host array).
    """

    __slots__ = ("tensor", "ptr", "numel", "typestr")

    def __init__(self, tensor: torch.Tensor):
        if not tensor.is_contiguous():
            raise ValueError("CudaCarrier needs a contiguous tensor")
        self.tensor = tensor
        self.ptr = tensor.data_ptr()
        self.numel = tensor.numel()
        self.typestr = _TYPESTR[tensor.dtype]


class _CudaArray:
    """Exposes ``__cuda_array_interface__`` (version 2) for one Julia ``CuArray``."""

    def __init__(self, interface: dict):
        self.__cuda_array_interface__ = interface


def cuda_interface(ptr: int, shape, typestr: str) -> dict:
    """The ``__cuda_array_interface__`` of a C-contiguous device array at ``ptr``."""
    if typestr not in _DTYPE:
        raise TypeError(f"only float32/float64 arrays cross from Julia, got typestr {typestr!r}")
    return {"shape": tuple(int(n) for n in shape), "typestr": typestr, "data": (int(ptr), False),
            "strides": None, "version": 2}


def cuda_view(ptr: int, shape, typestr: str, device: int) -> torch.Tensor:
    """A torch tensor viewing Julia's device memory at ``ptr`` (called from Julia).

    ``shape`` is the Julia array's size reversed (column-major memory read C-ordered). The tensor
    does not keep the memory alive: Julia holds the array until the callback returns, so the
    tensor must not be kept beyond it (the callbacks copy what they keep).
    """
    shape = tuple(int(n) for n in shape)
    dev = torch.device("cuda", int(device))
    if any(n == 0 for n in shape):
        return torch.empty(shape, dtype=_DTYPE[typestr], device=dev)
    view = torch.as_tensor(_CudaArray(cuda_interface(ptr, shape, typestr)), device=dev)
    if view.data_ptr() != int(ptr):
        # results are written into these views: a copy would silently lose them
        raise RuntimeError("torch copied a Julia CUDA array instead of viewing it "
                           f"(device {dev}, pointer {int(ptr):#x}); the julia backend needs "
                           "torch.as_tensor to honour __cuda_array_interface__ without a copy")
    return view


def sync(device: torch.device) -> None:
    """Wait for torch's queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _check(t: torch.Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise TypeError(f"only float32/float64 tensors cross to Julia, got {t.dtype}")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='julia' runs on CPU or CUDA tensors, got device {t.device}")


def vector_to_julia(t: torch.Tensor):
    """A 1-D view of ``t`` for a Julia function argument (NumPy view or CudaCarrier)."""
    _check(t)
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.device.type == "cpu":
        return flat.numpy()
    sync(flat.device)
    return CudaCarrier(flat)


def matrix_to_julia(g: torch.Tensor):
    """A ``(T, N)`` tensor as an ``N x T`` Julia matrix argument (column ``j`` = row ``j`` of ``g``)."""
    _check(g)
    g = g.detach()
    if not g.is_contiguous():
        g = g.contiguous()
    if g.device.type == "cpu":
        return g.t().numpy()  # (N, T), Fortran order: same memory
    sync(g.device)
    return CudaCarrier(g)  # the same memory is Julia's N x T column-major matrix


def julia_view(x) -> torch.Tensor:
    """A Julia array (ArrayValue, NumPy array, or a torch tensor from :func:`cuda_view`) as a tensor
    indexed like in Julia (``view[i, j] == x[i+1, j+1]``), sharing memory."""
    if isinstance(x, torch.Tensor):
        return x.permute(*reversed(range(x.dim()))) if x.dim() > 1 else x
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32/float64 Julia array, got dtype {arr.dtype}")
    return torch.from_numpy(arr)


def write(dst, src: torch.Tensor) -> None:
    """Copy ``src`` into the Julia array ``dst`` (same number of elements, Julia's indexing);
    nothing when ``dst`` is None (a product Julia did not ask for)."""
    if dst is None:
        return
    view = julia_view(dst)
    view.copy_(src.detach().reshape(view.shape))


def matrix_from_julia(x) -> torch.Tensor:
    """An ``N x T`` Julia matrix as a ``(T, N)`` tensor, copied into torch-owned memory so that
    its lifetime never depends on Julia's garbage collector."""
    return julia_view(x).t().clone()
