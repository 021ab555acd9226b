"""Flat views of (tuple) states and the wrapped right-hand side the solvers call."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .errors import SolverError

__all__ = ["StateSpec", "FlatRHS", "find_parameters", "unique_tensors", "add_note"]


class StateSpec:
    """Shapes of a state that is a tensor or a tuple of tensors, and its flat layout.

    The solvers work on one flat vector of ``N = sum(numel)`` entries; ``func`` always sees the
    user's structure (views into the flat vector, no copy for a single tensor).
    """

    def __init__(self, y0):
        self.is_tuple = isinstance(y0, (tuple, list))
        parts = tuple(y0) if self.is_tuple else (y0,)
        self.shapes = [p.shape for p in parts]
        self.numels = [p.numel() for p in parts]
        self.numel = sum(self.numels)
        self.dtype = parts[0].dtype
        self.device = parts[0].device

    def flatten(self, y) -> torch.Tensor:
        """User structure -> flat ``(N,)``."""
        if self.is_tuple:
            return torch.cat([p.reshape(-1) for p in y])
        return y.reshape(-1)

    def unflatten(self, flat: torch.Tensor):
        """Flat ``(N,)`` -> user structure (views)."""
        if self.is_tuple:
            return tuple(p.view(s) for p, s in zip(flat.split(self.numels), self.shapes))
        return flat.view(self.shapes[0])

    def flatten_time(self, ys) -> torch.Tensor:
        """``(T, *shape)`` or a tuple of such -> flat ``(T, N)``."""
        if self.is_tuple:
            return torch.cat([p.reshape(p.shape[0], -1) for p in ys], dim=1)
        return ys.reshape(ys.shape[0], -1)

    def unflatten_time(self, ys: torch.Tensor):
        """``(T, N)`` -> ``(T, *shape)`` or a tuple of such (views)."""
        T = ys.shape[0]
        if self.is_tuple:
            return tuple(p.reshape(T, *s) for p, s in zip(ys.split(self.numels, dim=1), self.shapes))
        return ys.reshape(T, *self.shapes[0])

    def check_output(self, out, t: float, method: str, context: str) -> torch.Tensor:
        """Flatten ``func``'s output after checking it has the state's structure and dtype."""
        parts = out if isinstance(out, (tuple, list)) else (out,)
        if isinstance(out, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):
            raise SolverError(
                f"{context} with method '{method}': func returned "
                f"{'a tuple of ' + str(len(parts)) if isinstance(out, (tuple, list)) else 'a single tensor'}"
                f" at t={t:.6g}, but the state is "
                f"{'a tuple of ' + str(len(self.shapes)) if self.is_tuple else 'a single tensor'}; "
                "func(t, y) must return dy/dt with the same structure as y.")
        for i, (p, s) in enumerate(zip(parts, self.shapes)):
            if not isinstance(p, torch.Tensor) or p.shape != s:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise SolverError(
                    f"{context} with method '{method}': func returned shape {got} at t={t:.6g} "
                    f"for state component {i} of shape {tuple(s)}; func(t, y) must return dy/dt "
                    "with the same shape as y.")
            if p.dtype != self.dtype:
                raise ValueError(
                    f"func returned dtype {p.dtype} for a state of dtype {self.dtype} (component {i}, "
                    f"t={t:.6g}); make the module's parameters match the state, e.g. "
                    f"module.to({self.dtype}) or y0.to({p.dtype}).")
        if self.is_tuple:
            return torch.cat([p.reshape(-1) for p in parts])
        return out.reshape(-1)


class FlatRHS:
    """``func(t, y)`` as the solvers see it: flat state in, flat derivative out.

    Counts evaluations in ``nfe`` and passes ``t`` to ``func`` as a 0-d tensor on the state's
    device (created with a fill, not a host-to-device copy).
    """

    def __init__(self, func, spec: StateSpec, time_dtype: torch.dtype, method: str):
        self.func, self.spec, self.time_dtype, self.method = func, spec, time_dtype, method
        self.nfe = 0
        self.context = "forward solve"

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        tt = torch.full((), t, dtype=self.time_dtype, device=y.device)
        try:
            out = self.func(tt, self.spec.unflatten(y))
        except Exception as e:
            add_note(e, f"raised by func at t={t:.6g} in the {self.context} with method "
                        f"'{self.method}'")
            raise
        return self.spec.check_output(out, t, self.method, self.context)


def add_note(exc: BaseException, note: str) -> None:
    """Say where an exception from user code happened without changing its type (PEP 678; a no-op
    before Python 3.11)."""
    if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def unique_tensors(tensors) -> tuple:
    """``tensors`` without repeats (by identity), in first-seen order: a tensor listed twice (tied
    weights passed as two modules' parameter lists) must get its gradient once, not twice."""
    out, seen = [], set()
    for x in tensors:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return tuple(out)


def find_parameters(func) -> list:
    """Tensors requiring grad that ``func`` uses: an ``nn.Module``'s parameters, a bound method's
    module, ``functools.partial`` arguments, and modules/tensors captured in a closure.

    Adjoint methods return gradients only for these (pass ``adjoint_params=`` to be explicit).
    """
    found, seen = [], set()

    def add_tensor(x):
        if isinstance(x, torch.Tensor) and x.requires_grad and id(x) not in seen:
            seen.add(id(x))
            found.append(x)

    def visit(obj, depth):
        if depth > 3 or obj is None:
            return
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                add_tensor(p)
        elif isinstance(obj, torch.Tensor):
            add_tensor(obj)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                visit(x, depth + 1)
        elif isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            visit(obj.args, depth + 1)
            visit(tuple(obj.keywords.values()), depth + 1)
        elif inspect.ismethod(obj):
            visit(obj.__self__, depth + 1)
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # empty cell
                    pass
            # A module-level lambda such as ``f = lambda t, y: net(y)`` reaches ``net`` as a global.
            for name in obj.__code__.co_names:
                g = obj.__globals__.get(name)
                if isinstance(g, (nn.Module, torch.Tensor)):
                    visit(g, depth + 1)
        elif callable(obj) and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                if isinstance(v, (nn.Module, torch.Tensor)):
                    visit(v, depth + 1)

    visit(func, 0)
    return found
