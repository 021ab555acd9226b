"""Memory accounting for networks with ODE blocks, before training.

In the spirit of the CS231n ConvNet notes ("memory: activations per layer, weights per layer"),
:func:`memory_report` runs one forward pass on an example input and lists, per layer, the output
(activation) bytes, the parameter bytes and the bytes autograd keeps for the backward pass. Each
ODE block is then extended with what every gradient method keeps for its backward, computed from
the block's state size, what one evaluation of its right-hand side saves, and the solver's step
count (and stages), output intervals and interpolation nodes (:func:`predict_backward_bytes`).
That shows up front why ``checkpointed`` or ``interpolated`` fits where ``backprop`` does not:
backprop keeps the activations of every stage of every step.

:func:`measure_saved_bytes` measures what a forward actually keeps (tensors saved by autograd,
via ``torch.autograd.graph.saved_tensors_hooks``, plus the checkpoints/interpolants a custom
``autograd.Function`` holds on its context), counting every storage once; the tests check the
predictions against it.
"""
from __future__ import annotations

import gc
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ._types import Func, State
from .backends.base import get_backend
from .nn.block import ODEBlock
from .odeint import odeint
from .sensitivity import SENSITIVITIES, BackwardMemory, Checkpointed, Interpolated, SolveSize, resolve_sensitivity
from .sensitivity.base import Sensitivity
from .solvers import TABLEAUX
from .stats import SolveStats

__all__ = ["LayerMemory", "BackwardMemory", "ODEBlockMemory", "MemoryReport", "SavedBytes",
           "memory_report", "predict_backward_bytes", "measure_saved_bytes", "probe_func",
           "SENSITIVITY_NAMES"]

#: The gradient methods a report predicts for (each predicts its own bytes).
SENSITIVITY_NAMES = tuple(SENSITIVITIES)


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class LayerMemory:
    """One row of the per-layer account (one call of a leaf module).

    Attributes:
        name: qualified module name (``"#2"`` appended for a module's second call).
        kind: module class name.
        output_shape: shape of the (first) output tensor.
        activation_bytes: bytes of the output tensor(s).
        param_bytes: bytes of the module's parameters (0 for a repeated call).
        saved_bytes: bytes of tensors this call saved for backward that no earlier row saved
            (storages are counted once, so the column sums to the total; parameters excluded).
        note: e.g. the gradient method of an ODE block.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    activation_bytes: int
    param_bytes: int
    saved_bytes: int
    note: str = ""


@dataclass
class ODEBlockMemory:
    """The backward-memory account of one ODE block.

    Attributes:
        name: module name of the block.
        state_shape: shape of the ODE state ``z`` (first component for tuple states).
        state_bytes: bytes ``s`` of the whole state.
        eval_saved_bytes: bytes ``g`` one evaluation of ``func`` saves for backward (parameters
            excluded), measured by a probe evaluation.
        param_bytes: bytes of ``func``'s parameters.
        method, stages, fsal: solver and its tableau's stage count / whether a step reuses the
            last stage of the step before (first-same-as-last, or ``carry_last``).
        steps: accepted steps of the forward solve on the example input.
        n_outputs: output times ``T`` (``T - 1`` output intervals).
        configured: the block's own gradient method.
        measured_kept_bytes: what the block's forward kept with its configured method (``None``
            for a bare function).
        predictions: per method name, a :class:`BackwardMemory`.
        func_layers: per-layer account of one evaluation of ``func``.
    """

    name: str
    state_shape: tuple[int, ...]
    state_bytes: int
    eval_saved_bytes: int
    param_bytes: int
    method: str
    stages: int
    fsal: bool
    steps: int
    n_outputs: int
    configured: str
    measured_kept_bytes: int | None
    predictions: dict[str, BackwardMemory] = field(default_factory=dict)
    func_layers: list[LayerMemory] = field(default_factory=list)


@dataclass
class MemoryReport:
    """Per-layer memory account of a model (or of an ODE function) and its ODE blocks.

    ``str(report)`` prints the tables. ``total_kept(m)``/``total_peak(m)`` estimate the whole
    model's backward memory if every ODE block used gradient method ``m``.

    Attributes:
        layers: rows in execution order (ODE blocks are one row each).
        ode_blocks: one :class:`ODEBlockMemory` per ODE block.
        other_saved_bytes: bytes saved by operations outside any module (functional calls).
        input_bytes: bytes of the example input.
    """

    layers: list[LayerMemory]
    ode_blocks: list[ODEBlockMemory]
    other_saved_bytes: int = 0
    input_bytes: int = 0

    @property
    def activation_bytes(self) -> int:
        """Sum of all layer outputs (the notes' "memory" column)."""
        return sum(r.activation_bytes for r in self.layers)

    @property
    def param_bytes(self) -> int:
        """Sum of all parameters (count x3 or more for gradients and optimizer state)."""
        return sum(r.param_bytes for r in self.layers)

    def _non_ode_saved(self) -> int:
        ode = {b.name for b in self.ode_blocks}
        return self.other_saved_bytes + sum(r.saved_bytes for r in self.layers if r.name not in ode)

    def total_kept(self, sensitivity: str | None = None) -> int:
        """Bytes kept for backward by the whole model: ODE blocks by ``sensitivity`` (predicted;
        ``None``: each block's measured bytes with its configured method)."""
        total = self._non_ode_saved()
        for b in self.ode_blocks:
            if sensitivity is None:
                total += b.measured_kept_bytes if b.measured_kept_bytes is not None else \
                    b.predictions[b.configured].kept_bytes
            else:
                total += b.predictions[sensitivity].kept_bytes
        return total

    def total_peak(self, sensitivity: str) -> int:
        """``total_kept(sensitivity)`` plus the largest transient of one block's backward."""
        extra = max((b.predictions[sensitivity].peak_bytes - b.predictions[sensitivity].kept_bytes
                     for b in self.ode_blocks), default=0)
        return self.total_kept(sensitivity) + extra

    def fits(self, budget_bytes: int) -> list[str]:
        """Gradient methods whose predicted peak (with the parameters, their gradients and the
        outputs) stays within ``budget_bytes``."""
        base = 2 * self.param_bytes + self.input_bytes
        return [m for m in SENSITIVITY_NAMES if base + self.total_peak(m) <= budget_bytes]

    def to_string(self, func_layers: bool = True) -> str:
        """The tables as text (``func_layers``: also list one evaluation of each ODE function)."""
        lines = [_table(["layer", "type", "output", "activations", "params", "saved for backward"],
                        [[r.name, r.kind + (f" [{r.note}]" if r.note else ""), _shape(r.output_shape),
                          _fmt(r.activation_bytes), _fmt(r.param_bytes), _fmt(r.saved_bytes)]
                         for r in self.layers]
                        + ([["(functional ops)", "", "", "", "", _fmt(self.other_saved_bytes)]]
                           if self.other_saved_bytes else [])
                        + [["TOTAL", "", "", _fmt(self.activation_bytes), _fmt(self.param_bytes),
                            _fmt(self.total_kept())]])]
        for b in self.ode_blocks:
            lines.append("")
            evals = b.steps * (b.stages - b.fsal) + b.fsal
            lines.append(f"ODE block {b.name!r}: state {_shape(b.state_shape)} = {_fmt(b.state_bytes)} (s); "
                         f"one evaluation of func saves {_fmt(b.eval_saved_bytes)} (g); {b.method}, "
                         f"{b.steps} accepted steps x {b.stages} stages ({evals} evaluations kept by "
                         f"backprop), {b.n_outputs - 1} output interval(s); configured: {b.configured}"
                         + (f", measured {_fmt(b.measured_kept_bytes)}"
                            if b.measured_kept_bytes is not None else ""))
            lines.append(_table(["method", "kept for backward", "peak in backward",
                                 "whole-model peak", "formula"],
                                [[p.sensitivity, _fmt(p.kept_bytes), _fmt(p.peak_bytes),
                                  _fmt(self.total_peak(p.sensitivity)) if self.ode_blocks else "",
                                  p.detail] for p in b.predictions.values()]))
            if func_layers and b.func_layers:
                lines.append(f"  one evaluation of {b.name or 'func'}:")
                lines.append(_table(["layer", "type", "output", "activations", "params", "saved"],
                                    [[r.name, r.kind, _shape(r.output_shape), _fmt(r.activation_bytes),
                                      _fmt(r.param_bytes), _fmt(r.saved_bytes)] for r in b.func_layers],
                                    indent="  "))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


@dataclass
class SavedBytes:
    """Result of :func:`measure_saved_bytes`.

    Attributes:
        total_bytes: unique storages kept for backward (``autograd_bytes + context_bytes`` less
            storages counted in both).
        autograd_bytes: storages saved through autograd (``save_for_backward`` and built-in ops)
            that are still alive after the call.
        context_bytes: storages a custom ``autograd.Function`` keeps on its context (checkpoints,
            interpolation nodes, dense output) reachable from the output's graph.
        n_storages: number of unique storages counted.
        output: what the measured callable returned (keep it to run the backward).
    """

    total_bytes: int
    autograd_bytes: int
    context_bytes: int
    n_storages: int
    output: object = None


# ----------------------------------------------------------------------------------------------
# prediction


def predict_backward_bytes(sensitivity: str | Sensitivity, *, state_bytes: int, steps: int,
                           eval_saved_bytes: int = 0, method: str = "dopri5", n_outputs: int = 2,
                           nodes: int | str | None = None, every: int | None = None,
                           checkpointing: bool | None = None, param_bytes: int = 0) -> BackwardMemory:
    """Bytes a gradient method keeps for the backward of one ODE solve, and its peak.

    With ``s = state_bytes``, ``g = eval_saved_bytes`` (what one evaluation of ``func`` saves),
    ``N`` accepted steps of an ``S``-stage tableau and ``T`` output times (all methods but
    backprop keep the ``T`` outputs):

    * ``backprop``: the graph of every kept evaluation, ``(N (S - fsal) + fsal) g``.
    * ``checkpointed(every=k)``: ``ceil(N / k)`` step-start states; the backward rebuilds the graph
      of ``k`` steps (``k S g``) at a time.
    * ``interpolated(nodes=n)``: ``n + 1`` Chebyshev node states per output interval
      (``nodes="auto"``: at most ``max_nodes + 1``); backward transient: one VJP graph ``g``.
    * ``interpolating``: the dense output, ``N + 1`` states and ``P`` polynomial coefficients per
      step (``P = 4`` for dopri5/tsit5, 3 for the cubic Hermite of other tableaux); with
      ``checkpointing``, ``ceil(N / k)`` states (``k = ceil(sqrt(N))`` by default) and one segment's
      dense output during the backward.
    * ``backsolve``: nothing but the outputs.

    Adjoint methods also need ``S + 2`` adjoint-sized vectors (twice that for backsolve's
    ``[z, a]``) and ``S + 1`` parameter-sized quadrature vectors while solving backwards.

    Each method computes its own figures (:meth:`~pyode_bridge.Sensitivity.predict_backward_bytes`
    on a :class:`~pyode_bridge.sensitivity.SolveSize`); this function only measures the tableau.

    Args:
        sensitivity: method name or instance (``Checkpointed(every=4)``, ``Interpolated(nodes=8)``,
            ``Interpolating(checkpointing=True)``, or a method of your own that implements
            ``predict_backward_bytes``); instance settings are used unless overridden.
        state_bytes: bytes of the state (all components, the whole batch).
        steps: accepted steps ``N`` of the forward solve.
        eval_saved_bytes: bytes one evaluation of ``func`` saves for backward (see :func:`probe_func`).
        method: solver name (gives ``S``, FSAL and ``P``).
        n_outputs: output times ``T``.
        nodes, every, checkpointing: override the method's settings.
        param_bytes: bytes of ``func``'s parameters (adjoint quadrature workspace).

    Returns:
        :class:`BackwardMemory` with ``kept_bytes`` and ``peak_bytes``.
    """
    strat = resolve_sensitivity(sensitivity)
    tab = TABLEAUX[method]
    # An adaptive solve of a carry_last tableau reuses the last stage like an FSAL one.
    size = SolveSize(state_bytes=int(state_bytes), steps=int(steps), eval_saved_bytes=int(eval_saved_bytes),
                     stages=tab.stages, fsal=int(tab.fsal or tab.carry_last),
                     dense_coeffs=len(tab.dense[0]) if tab.dense is not None else 3,
                     n_outputs=int(n_outputs), param_bytes=int(param_bytes))
    return strat.predict_backward_bytes(size, nodes=nodes, every=every, checkpointing=checkpointing)


# ----------------------------------------------------------------------------------------------
# measurement


def _key(t: torch.Tensor) -> tuple[tuple[str, int | None, int], int]:
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()


class _Box:
    """What the pack hook hands autograd instead of the tensor: its liveness is the graph's."""

    __slots__ = ("t", "tag", "seq", "__weakref__")

    def __init__(self, t: torch.Tensor, tag: int | None, seq: int):
        # Detached: holding a saved output itself would make a cycle (node -> box -> tensor ->
        # node) that keeps throwaway graphs (e.g. a CNF's trace under no_grad) alive and counted.
        self.t, self.tag, self.seq = t.detach(), tag, seq


class _Recorder:
    """Wraps every tensor autograd saves in a :class:`_Box` tracked by a ``WeakSet``: boxes still
    alive after the forward are exactly the saved tensors the graph still holds."""

    def __init__(self) -> None:
        self.boxes: weakref.WeakSet[_Box] = weakref.WeakSet()
        self.seq = 0

    def hooks(self, tag: int | None) -> torch.autograd.graph.saved_tensors_hooks:
        """A scope whose saved tensors are tagged ``tag`` (a row index, or None outside any unit)."""
        def pack(t: torch.Tensor) -> _Box:
            self.seq += 1
            box = _Box(t, tag, self.seq)
            self.boxes.add(box)
            return box

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t)

    def alive(self) -> list[_Box]:
        gc.collect()
        return sorted(list(self.boxes), key=lambda b: b.seq)


def _context_tensors(roots: Iterable[Any], stop: frozenset = frozenset()) -> list[torch.Tensor]:
    """Tensors held on the contexts of custom ``autograd.Function`` nodes reachable from ``roots``
    (grad_fn nodes), not descending into ``stop`` nodes."""
    found: list[torch.Tensor] = []
    seen_nodes, stack = set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen_nodes or node in stop:
            continue
        seen_nodes.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            _walk_objects(vars(node), found)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def _walk_objects(obj: object, found: list[torch.Tensor], depth: int = 0, seen: set[int] | None = None
                  ) -> None:
    seen = set() if seen is None else seen
    if depth > 12 or id(obj) in seen or obj is None or isinstance(obj, (int, float, str, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (nn.Module, type)) or inspect.isroutine(obj):
        return  # parameters live in the model anyway; code holds no activations
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_objects(v, found, depth + 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk_objects(v, found, depth + 1, seen)
    elif hasattr(obj, "__dict__"):
        _walk_objects(vars(obj), found, depth + 1, seen)


def _grad_fns(out: Any) -> list[Any]:
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return [p.grad_fn for p in parts if isinstance(p, torch.Tensor) and p.grad_fn is not None]


def _param_keys(modules: Iterable[nn.Module | torch.Tensor]) -> set[tuple[str, int | None, int]]:
    keys = set()
    for m in modules:
        tensors = list(m.parameters()) + list(m.buffers()) if isinstance(m, nn.Module) else [m]
        for p in tensors:
            keys.add(_key(p)[0])
    return keys


def measure_saved_bytes(fn: Callable[..., Any], *args: Any, exclude: Iterable[nn.Module | torch.Tensor] = (),
                        **kwargs: Any) -> SavedBytes:
    """Run ``fn(*args, **kwargs)`` with grad enabled and measure what it keeps for backward.

    Counts every storage once: tensors saved through autograd (``saved_tensors_hooks``) that the
    graph still holds after the call, plus tensors custom ``autograd.Function`` s keep on their
    context (how the memory-lean gradient methods store checkpoints and interpolants).

    Args:
        fn: the computation, e.g. ``lambda: block(x)``.
        *args, **kwargs: passed to ``fn``.
        exclude: modules or tensors whose storages are not counted (parameters: they exist
            whether or not a backward follows).

    Returns:
        :class:`SavedBytes` (``.output`` holds ``fn``'s result).
    """
    rec = _Recorder()
    with torch.enable_grad(), rec.hooks(None):
        out = fn(*args, **kwargs)
    skip = _param_keys(exclude)
    auto, seen = 0, set()
    for box in rec.alive():
        k, nb = _key(box.t)
        if k not in skip and k not in seen:
            seen.add(k)
            auto += nb
    ctx = 0
    for t in _context_tensors(_grad_fns(out)):
        k, nb = _key(t)
        if k not in skip and k not in seen:
            seen.add(k)
            ctx += nb
    return SavedBytes(auto + ctx, auto, ctx, len(seen), out)


# ----------------------------------------------------------------------------------------------
# per-layer profiling


def _nbytes(x: object) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


def _first_shape(x: object) -> tuple[int, ...]:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and x:
        return _first_shape(x[0])
    return ()


def _units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Modules reported as one row: leaves, parametrized leaves (weight norm) and ODE blocks,
    without descending into them."""
    children = list(module.named_children())
    if isinstance(module, ODEBlock) or parametrize.is_parametrized(module) or not children:
        yield prefix, module
        return
    for name, child in children:
        yield from _units(child, f"{prefix}.{name}" if prefix else name)


class _Profiler:
    """Forward hooks that give every unit call its own saved-tensor scope and row."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.rec = _Recorder()
        self.rows: list[LayerMemory] = []
        # per row: (the saved-tensor sequence number the block's context tensors sort at, tensors)
        self.ctx_tensors: dict[int, tuple[float, list[torch.Tensor]]] = {}
        self.calls: dict[str, int] = {}
        self.blocks: list[tuple[int, ODEBlock, State, SolveStats]] = []  # (row, block, input, stats)
        self._handles: list[RemovableHandle] = []
        self._open: list[tuple[Any, int, Any, frozenset]] = []  # (scope, row, inputs, stop nodes)

    def __enter__(self) -> _Profiler:
        for name, m in _units(self.root):
            self._handles.append(m.register_forward_pre_hook(self._pre(name, m)))
            self._handles.append(m.register_forward_hook(self._post(name, m)))
        return self

    def __exit__(self, *exc: object) -> None:
        while self._open:
            self._open.pop()[0].__exit__(None, None, None)
        for h in self._handles:
            h.remove()

    def _pre(self, name: str, m: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple) -> None:
            n = self.calls.get(name, 0) + 1
            self.calls[name] = n
            idx = len(self.rows)
            label = (name or type(m).__name__) + (f"#{n}" if n > 1 else "")
            self.rows.append(LayerMemory(label, type(m).__name__, (), 0,
                                         _nbytes(list(m.parameters())) if n == 1 else 0, 0))
            scope = self.rec.hooks(idx)
            scope.__enter__()
            stop = frozenset(_grad_fns(inputs[0] if len(inputs) == 1 else inputs))
            self._open.append((scope, idx, inputs, stop))
        return hook

    def _post(self, name: str, m: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
            scope, idx, inputs, stop = self._open.pop()
            scope.__exit__(None, None, None)
            row = self.rows[idx]
            row.output_shape, row.activation_bytes = _first_shape(output), _nbytes(output)
            if isinstance(m, ODEBlock):
                # Checkpoints / interpolants of the memory-lean methods sit on the Function's ctx.
                self.ctx_tensors[idx] = (self.rec.seq + 0.5, _context_tensors(_grad_fns(output), stop))
                x = inputs[0]
                x = tuple(v.detach().clone() for v in x) if isinstance(x, (tuple, list)) \
                    else x.detach().clone()
                self.blocks.append((idx, m, x, m.stats))
                sens = m.sensitivity if isinstance(m.sensitivity, str) else m.sensitivity.name
                row.note = f"{m.method}, {m.stats.steps_forward} steps, {sens}"
        return hook

    def account(self, exclude_keys: set) -> int:
        """Attribute alive saved storages to rows (first saver wins); return the bytes saved outside
        any unit."""
        seen, other = set(), 0
        per_row: dict[int, int] = {}
        items: list[tuple[float, int | None, torch.Tensor]] = [(b.seq, b.tag, b.t) for b in self.rec.alive()]
        for idx, (seq, tensors) in self.ctx_tensors.items():
            # Context tensors are created inside the block call: order them right after its packs.
            items += [(seq, idx, t) for t in tensors]
        for _, tag, t in sorted(items, key=lambda x: x[0]):
            k, nb = _key(t)
            if k in exclude_keys or k in seen:
                continue
            seen.add(k)
            if tag is None:
                other += nb
            else:
                per_row[tag] = per_row.get(tag, 0) + nb
        for idx, nb in per_row.items():
            self.rows[idx].saved_bytes = nb
        return other


def _snapshot_buffers(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b, b.detach().clone()) for b in module.buffers()]


def _restore_buffers(snap: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, v in snap:
            b.copy_(v)


def probe_func(func: Func, x: State, t: float = 0.0) -> tuple[int, list[LayerMemory]]:
    """What one evaluation of an ODE function saves for backward.

    Evaluates ``func(t, x')`` once on a fresh copy ``x'`` of ``x`` that requires grad (as the stage
    states of a solve do) with per-layer scopes; buffers (BatchNorm statistics) are restored.

    Args:
        func: ``func(t, z)``, a module or a callable.
        x: example state (tensor or tuple), e.g. the input of the ODE block.
        t: evaluation time.

    Returns:
        ``(eval_saved_bytes, rows)``: bytes saved (parameters excluded) and per-layer
        :class:`LayerMemory` rows (the last row, ``"(functional ops)"``, is what no module saved).
    """
    xs = tuple(v.detach().clone().requires_grad_(True) for v in x) if isinstance(x, (tuple, list)) \
        else x.detach().clone().requires_grad_(True)
    ref = x[0] if isinstance(x, (tuple, list)) else x
    tt = torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
    module = func if isinstance(func, nn.Module) else None
    snap = _snapshot_buffers(module) if module is not None else []
    exclude = _param_keys([module]) if module is not None else set()
    try:
        with torch.enable_grad():
            if module is not None:
                prof = _Profiler(module)
                with prof, prof.rec.hooks(None):
                    out = func(tt, xs)
                other = prof.account(exclude)
                rows = prof.rows
            else:
                # A plain callable has no layers to hook: one scope for everything it saves.
                prof = _Profiler(nn.Module())
                with prof.rec.hooks(None):
                    out = func(tt, xs)
                other = prof.account(exclude)
                rows = []
    finally:
        _restore_buffers(snap)
    if other:
        rows = rows + [LayerMemory("(functional ops)", "", (), 0, 0, other)]
    total = sum(r.saved_bytes for r in rows)
    del out
    return total, rows


def _block_memory(name: str, func: Func, x: State, *, method: str, steps: int, n_outputs: int,
                  configured: str, measured: int | None, t0: float,
                  overrides: dict[str, Sensitivity]) -> ODEBlockMemory:
    g, rows = probe_func(func, x, t0)
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    s = sum(_nbytes(p) for p in parts)
    pb = _nbytes(list(func.parameters())) if isinstance(func, nn.Module) else 0
    tab = TABLEAUX[method]
    preds: dict[str, BackwardMemory] = {}
    for m in SENSITIVITY_NAMES:
        strat: str | Sensitivity = overrides.get(m, m)
        preds[m] = predict_backward_bytes(strat, state_bytes=s, steps=steps, eval_saved_bytes=g,
                                          method=method, n_outputs=n_outputs, param_bytes=pb)
    return ODEBlockMemory(name=name, state_shape=tuple(parts[0].shape), state_bytes=s,
                          eval_saved_bytes=g, param_bytes=pb, method=method, stages=tab.stages,
                          fsal=tab.fsal or tab.carry_last, steps=steps, n_outputs=n_outputs, configured=configured,
                          measured_kept_bytes=measured, predictions=preds, func_layers=rows)


def _takes_time(obj: object) -> bool:
    fn: Any = obj.forward if isinstance(obj, nn.Module) else obj
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 2


def memory_report(model_or_func: nn.Module | Func, example_input: State, *, ode_func: bool | None = None,
                  steps: int | None = None, method: str = "dopri5", t: Sequence[float] = (0.0, 1.0),
                  rtol: float = 1e-3, atol: float = 1e-3, options: dict | None = None,
                  sensitivity: str | Sensitivity = "backprop", nodes: int | str | None = None,
                  every: int | None = None) -> MemoryReport:
    """Per-layer memory account and per-gradient-method backward memory of ODE blocks.

    For a model (any ``nn.Module`` taking one input, possibly containing
    :class:`~pyode_bridge.nn.ODEBlock` s) one forward runs on ``example_input`` with hooks on every
    leaf layer; each ODE block's accepted steps come from that forward's solve, and what one
    evaluation of its ``func`` saves from a probe evaluation on the block's input. Module buffers
    (BatchNorm running statistics) are restored afterwards.

    For an ODE function (``func(t, z)``; detected from the signature or forced with
    ``ode_func=True``) ``example_input`` is the state; the step count is ``steps`` or, if ``None``,
    that of one solve with ``method``/``rtol``/``atol``/``options`` over ``t``.

    Args:
        model_or_func: the model, an ``ODEBlock``, or an ODE function.
        example_input: a batch of the size you will train with (memory scales with it).
        ode_func: force (``True``) or forbid (``False``) the ODE-function interpretation.
        steps, method, t, rtol, atol, options: the solve of a bare ODE function.
        sensitivity: a bare function's configured method (the measured column is left empty).
        nodes, every: ``Interpolated`` nodes and ``Checkpointed`` interval for the predictions
            (default: the block's own settings when it uses that method, else 16 and 1).

    Returns:
        :class:`MemoryReport`; ``print(report)`` shows the tables.

    Example:
        >>> import torch
        >>> from pyode_bridge.memory import memory_report
        >>> from pyode_bridge.models import build_model
        >>> rep = memory_report(build_model("odenet", width=8), torch.randn(4, 3, 32, 32))
        >>> block = rep.ode_blocks[0]
        >>> block.predictions["checkpointed"].kept_bytes < block.predictions["backprop"].kept_bytes
        True
        >>> print(rep)  # doctest: +SKIP
    """
    overrides: dict[str, Sensitivity] = {}
    if nodes is not None:
        overrides["interpolated"] = Interpolated(nodes=nodes)
    if every is not None:
        overrides["checkpointed"] = Checkpointed(every=every)

    if ode_func is None:
        ode_func = not isinstance(model_or_func, ODEBlock) and _takes_time(model_or_func)
    if ode_func:
        func, x = model_or_func, example_input
        t_span = torch.as_tensor(t, dtype=(x[0] if isinstance(x, (tuple, list)) else x).dtype)
        if steps is None:
            st = SolveStats()
            with torch.no_grad():
                odeint(func, x, t_span, rtol=rtol, atol=atol, method=method, options=options, stats=st)
            steps = st.steps_forward
        strategy = resolve_sensitivity(sensitivity)
        configured = strategy.name
        own = dict(overrides)
        own.setdefault(configured, strategy)
        block = _block_memory("func", func, x, method=method, steps=int(steps), n_outputs=len(t_span),
                              configured=configured, measured=None, t0=float(t_span[0]),
                              overrides=own)
        # One row for the solve as a whole; the per-evaluation layers print under the block.
        row = LayerMemory("func", type(func).__name__, block.state_shape, block.state_bytes,
                          block.param_bytes, block.predictions[configured].kept_bytes,
                          note=f"{method}, {block.steps} steps, {configured}, predicted")
        return MemoryReport(layers=[row], ode_blocks=[block], input_bytes=_nbytes(x))

    model = cast(nn.Module, model_or_func)  # not an ODE function: a model taking one input
    snap = _snapshot_buffers(model)
    exclude = _param_keys([model])
    prof = _Profiler(model)
    try:
        with torch.enable_grad(), prof, prof.rec.hooks(None):
            out = model(example_input)
        other = prof.account(exclude)
        blocks = []
        for idx, m, x, stats in prof.blocks:
            backend = get_backend(m.backend)
            strat = backend.resolve_sensitivity(m.sensitivity) if backend.models_memory else None
            own = dict(overrides)
            if strat is not None and strat.name in SENSITIVITY_NAMES and strat.name not in own:
                own[strat.name] = strat
            blocks.append(_block_memory(
                prof.rows[idx].name, m.func, x, method=m.method, steps=stats.steps_forward,
                n_outputs=int(m.t_span.numel()), configured=strat.name if strat else str(m.sensitivity),
                measured=prof.rows[idx].saved_bytes, t0=float(m.t_span[0]), overrides=own))
    finally:
        _restore_buffers(snap)
    del out
    return MemoryReport(layers=prof.rows, ode_blocks=blocks, other_saved_bytes=other,
                        input_bytes=_nbytes(example_input))


# ----------------------------------------------------------------------------------------------
# formatting


def _fmt(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _shape(s: Sequence[int]) -> str:
    return "(" + ", ".join(str(v) for v in s) + ")" if s else ""


def _table(header: list[str], rows: list[list[Any]], indent: str = "") -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: indent + "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), indent + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])

