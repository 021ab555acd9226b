"""Tensors across the Python/Julia boundary, without copies where the solver allows it.

CPU: a contiguous tensor is handed to Julia as ``tensor.numpy()`` (same memory), which juliacall
passes to Julia functions as a ``PyArray`` (no copy); a Julia array reaches Python as a
``juliacall.ArrayValue`` exposing the NumPy array interface, read with ``np.asarray`` and
``torch.from_numpy`` (no copy). Julia matrices are column-major: an ``N x T`` Julia matrix is a
``(T, N)`` C-contiguous tensor after ``.T``.

CUDA: tensors go to Julia inside a :class:`DLPackCarrier` (only ``__dlpack__``; juliacall would
otherwise try the tensor's ``__array__``), which keeps the producing tensor alive; Julia copies
the memory into a ``CuArray`` it owns. Julia's CUDA arrays reach Python as torch tensors shared
through DLPack, with their dimensions reversed (undone by :func:`julia_view`). Torch and CUDA.jl
use different streams: before Julia reads torch's memory, :func:`sync` waits for torch's current
stream; Julia waits for its own before Python reads Julia's (``PyodeBridge.sync_device``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["DLPackCarrier", "vector_to_julia", "matrix_to_julia", "julia_view", "write",
           "matrix_from_julia", "sync"]

_FLOATS = (torch.float32, torch.float64)


class DLPackCarrier:
    """A CUDA tensor offered to Julia through DLPack only (keeps the tensor alive)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __dlpack__(self, *args, **kwargs):
        return self.tensor.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


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
    """A 1-D view of ``t`` for a Julia function argument (NumPy view or DLPack carrier)."""
    _check(t)
    flat = t.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.device.type == "cpu":
        return flat.numpy()
    sync(flat.device)
    return DLPackCarrier(flat)


def matrix_to_julia(g: torch.Tensor):
    """A ``(T, N)`` tensor as an ``N x T`` Julia matrix argument (column ``j`` = row ``j`` of ``g``)."""
    _check(g)
    g = g.detach()
    if not g.is_contiguous():
        g = g.contiguous()
    if g.device.type == "cpu":
        return g.t().numpy()  # (N, T), Fortran order: same memory
    sync(g.device)
    return DLPackCarrier(g)  # DLPack reverses the dimensions: Julia sees N x T


def julia_view(x) -> torch.Tensor:
    """A Julia array (ArrayValue, NumPy array, or a torch tensor shared by DLPack) as a tensor
    indexed like in Julia (``view[i, j] == x[i+1, j+1]``), sharing memory."""
    if isinstance(x, torch.Tensor):
        return x.permute(*reversed(range(x.dim()))) if x.dim() > 1 else x
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32/float64 Julia array, got dtype {arr.dtype}")
    return torch.from_numpy(arr)


def write(dst, src: torch.Tensor) -> None:
    """Copy ``src`` into the Julia array ``dst`` (same number of elements, Julia's indexing)."""
    view = julia_view(dst)
    view.copy_(src.detach().reshape(view.shape))


def matrix_from_julia(x) -> torch.Tensor:
    """An ``N x T`` Julia matrix as a ``(T, N)`` tensor, copied into torch-owned memory so that
    its lifetime never depends on Julia's garbage collector."""
    return julia_view(x).t().clone()
