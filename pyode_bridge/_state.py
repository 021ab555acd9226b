"""Flat views of (tuple) states and the wrapped right-hand side the solvers call."""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from ._types import FlatState, FlatTrajectory, Func, State
from .errors import SolverError

if TYPE_CHECKING:
    from .solvers.compiled import CompiledStep

__all__ = ["State", "StateSpec", "SolveContext", "FlatRHS", "find_parameters", "unique_tensors", "add_note"]


class StateSpec:
    """Shapes of a state that is a tensor or a tuple of tensors, and its flat layout.

    The solvers work on one flat vector of ``N = sum(numel)`` entries; ``func`` always sees the
    user's structure (views into the flat vector, no copy for a single tensor).
    """

    def __init__(self, y0: State):
        self.is_tuple = isinstance(y0, (tuple, list))
        parts = tuple(y0) if self.is_tuple else (y0,)
        self.shapes = [p.shape for p in parts]
        self.numels = [p.numel() for p in parts]
        self.numel = sum(self.numels)
        self.dtype = parts[0].dtype
        self.device = parts[0].device

    def flatten(self, y: State) -> FlatState:
        """User structure -> flat ``(N,)``."""
        if isinstance(y, torch.Tensor):
            return y.reshape(-1)
        return torch.cat([p.reshape(-1) for p in y])

    def unflatten(self, flat: FlatState) -> State:
        """Flat ``(N,)`` -> user structure (views)."""
        if self.is_tuple:
            return tuple(p.view(s) for p, s in zip(flat.split(self.numels), self.shapes))
        return flat.view(self.shapes[0])

    def flatten_time(self, ys: State) -> FlatTrajectory:
        """``(T, *shape)`` or a tuple of such -> flat ``(T, N)``."""
        if isinstance(ys, torch.Tensor):
            return ys.reshape(ys.shape[0], -1)
        return torch.cat([p.reshape(p.shape[0], -1) for p in ys], dim=1)

    def unflatten_time(self, ys: FlatTrajectory) -> State:
        """``(T, N)`` -> ``(T, *shape)`` or a tuple of such (views)."""
        T = ys.shape[0]
        if self.is_tuple:
            return tuple(p.reshape(T, *s) for p, s in zip(ys.split(self.numels, dim=1), self.shapes))
        return ys.reshape(T, *self.shapes[0])

    def check_output(self, out: Any, t: float, method: str, context: str) -> FlatState:
        """Flatten ``func``'s output after checking it has the state's structure and dtype."""
        parts = out if isinstance(out, (tuple, list)) else (out,)
        if (isinstance(out, (tuple, list)) == self.is_tuple and len(parts) == len(self.shapes)
                and all(isinstance(p, torch.Tensor) and p.dtype == self.dtype and p.shape == s
                        for p, s in zip(parts, self.shapes))):
            if self.is_tuple:
                return torch.cat([p.reshape(-1) for p in parts])
            return out.reshape(-1)
        where = f"{context} with method '{method}': func returned"
        if isinstance(out, (tuple, list)) != self.is_tuple or len(parts) != len(self.shapes):
            if not self.is_tuple:
                fix = "return dy/dt as one tensor of y's shape, not a tuple"
            else:
                fix = (f"return a tuple of {len(self.shapes)} tensors, dy/dt of each part of y in "
                       "y's order")
            raise SolverError(
                f"{where} "
                f"{'a tuple of ' + str(len(parts)) if isinstance(out, (tuple, list)) else 'a single tensor'}"
                f" at t={t:.6g}, but the state is "
                f"{'a tuple of ' + str(len(self.shapes)) if self.is_tuple else 'a single tensor'}; "
                f"func(t, y) must return dy/dt with the same structure as y: {fix}.")
        for i, (p, s) in enumerate(zip(parts, self.shapes)):
            y = f"y[{i}]" if self.is_tuple else "y"  # how func's code names this part
            if not isinstance(p, torch.Tensor):
                raise SolverError(
                    f"{where} {type(p).__name__} at t={t:.6g} for state component {i} of shape "
                    f"{tuple(s)}; func(t, y) must return dy/dt as a torch.Tensor of {y}'s shape"
                    f"{_non_tensor_hint(p, y)}.")
            if p.shape != s:
                raise SolverError(
                    f"{where} shape {tuple(p.shape)} at t={t:.6g} for state component {i} of shape "
                    f"{tuple(s)}; func(t, y) must return dy/dt with the same shape as y"
                    f"{_shape_hint(p.shape, s, y)}.")
            if p.dtype != self.dtype:
                raise ValueError(
                    f"func returned dtype {p.dtype} for a state of dtype {self.dtype} (component {i}, "
                    f"t={t:.6g}); {_dtype_hint(p.dtype, self.dtype, y)}.")
        if self.is_tuple:
            return torch.cat([p.reshape(-1) for p in parts])
        return out.reshape(-1)


def _non_tensor_hint(p: Any, y: str) -> str:
    """What to return instead of ``p`` (not a tensor); ``y`` is how func names the state part."""
    if p is None:
        return " (does func end with a return statement?)"
    if isinstance(p, (int, float)):
        return f": a constant rate is torch.full_like({y}, {float(p)!r})"
    if hasattr(p, "__array__"):
        return ": compute it with torch operations (a numpy array carries no gradient)"
    return ""


def _shape_hint(got: torch.Size, want: torch.Size, y: str) -> str:
    # Only a broadcast has one obvious fix; a reshape could silently scramble a transposed output.
    try:
        broadcasts = torch.broadcast_shapes(got, want) == want
    except RuntimeError:
        broadcasts = False
    return f" (if dy/dt is meant to broadcast, return dy.expand_as({y}))" if broadcasts else ""


def _dtype_hint(got: torch.dtype, want: torch.dtype, y: str) -> str:
    """How to make func's output dtype ``got`` the state's ``want`` (casting an integer output is
    the only fix for it: a state cannot be integer)."""
    if not got.is_floating_point:
        return (f"dy/dt must be a floating tensor of the state's dtype: cast func's output, e.g. "
                f"return dy.to({y}.dtype)")
    return (f"dy/dt must have the state's dtype: make func compute in {want} (create its tensors with "
            f"dtype={y}.dtype, convert its module with module.to({want})) or cast its output with "
            f".to({y}.dtype); to solve in {got} instead, pass y0.to({got}) with func's module in {got}")


class SolveContext:
    """The phase a right-hand side is evaluated in (``"forward solve"``, ``"backward pass
    (backsolve)"``, ...), which its errors name: ``"raised by func at t=... in the {context}"``."""

    context: str = "forward solve"

    @contextlib.contextmanager
    def solving(self, context: str) -> Iterator[None]:
        """Evaluate in ``context`` inside the ``with`` block; the previous context comes back on
        exit, also when an exception passes through (a failed backward must not leave a reused
        ``func`` naming the backward in its next forward's errors)."""
        previous, self.context = self.context, context
        try:
            yield
        finally:
            self.context = previous


class FlatRHS(SolveContext):
    """``func(t, y)`` as the solvers see it: flat state ``(N,)`` in, flat derivative ``(N,)`` out.

    Counts evaluations in ``nfe`` and passes ``t`` to ``func`` as a fresh 0-d tensor of
    ``time_dtype`` on the state's device (a fill, not a host-to-device copy; fresh because ``func``
    or autograd may keep it, and a reused buffer would change under them).

    The hot path is a few attribute reads around ``func``: the state reaches ``func`` as a view of
    the flat vector (the vector itself for a 1-D state), and the output is accepted after an
    identity check of its type, shape and dtype (~0.2 us). Anything else - a tuple where a tensor
    was expected, a wrong shape or dtype, a non-tensor - goes through
    :meth:`StateSpec.check_output`, which raises the error naming the fix (on any call, not only
    the first: a func whose output changes shape mid-solve must not broadcast silently).
    """

    def __init__(self, func: Func, spec: StateSpec, time_dtype: torch.dtype | None, method: str,
                 context: str = "forward solve"):
        self.func, self.spec, self.time_dtype, self.method = func, spec, time_dtype, method
        self.nfe = 0
        self.context = context
        # options={"compile": ...}: the solve's compiled step, which rk_step uses in place of its
        # eager stage loop.
        self.compiled: CompiledStep | None = None
        # Fast-path constants: a single-tensor state's shape as a tuple of ints (view() with ints is
        # cheaper than with a torch.Size) and whether the flat vector is already that shape.
        self._single = not spec.is_tuple
        # Read only where _single holds (a tuple state has no one shape).
        self._shape: tuple[int, ...] = tuple(spec.shapes[0]) if self._single else ()
        self._flat_is_shape = self._single and len(self._shape) == 1
        self._dtype = spec.dtype
        self._device = spec.device

    def __call__(self, t: float, y: FlatState) -> FlatState:
        self.nfe += 1
        tt = torch.full((), t, dtype=self.time_dtype, device=self._device)
        state: State
        if self._flat_is_shape:
            state = y
        elif self._single:
            state = y.view(self._shape)
        else:
            state = self.spec.unflatten(y)
        try:
            out = self.func(tt, state)
        except Exception as e:
            add_note(e, f"raised by func at t={t:.6g} in the {self.context} with method "
                        f"'{self.method}'")
            raise
        if (self._single and isinstance(out, torch.Tensor) and out.dtype == self._dtype
                and out.shape == self._shape):
            return out if self._flat_is_shape else out.reshape(-1)
        return self.spec.check_output(out, t, self.method, self.context)


def add_note(exc: BaseException, note: str) -> None:
    """Say where an exception from user code happened without changing its type (PEP 678; a no-op
    before Python 3.11)."""
    if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def unique_tensors(tensors: Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``tensors`` without repeats (by identity), in first-seen order: a tensor listed twice (tied
    weights passed as two modules' parameter lists) must get its gradient once, not twice."""
    out, seen = [], set()
    for x in tensors:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return tuple(out)


def find_parameters(func: Func) -> list[torch.Tensor]:
    """Tensors requiring grad that ``func`` uses: an ``nn.Module``'s parameters, a bound method's
    module, ``functools.partial`` arguments, and modules/tensors captured in a closure.

    Adjoint methods return gradients only for these (pass ``adjoint_params=`` to be explicit).
    """
    found, seen = [], set()

    def add_tensor(x: object) -> None:
        if isinstance(x, torch.Tensor) and x.requires_grad and id(x) not in seen:
            seen.add(id(x))
            found.append(x)

    def visit(obj: object, depth: int) -> None:
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
