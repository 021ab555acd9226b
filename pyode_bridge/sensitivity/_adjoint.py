"""Pieces shared by the optimize-then-discretize methods: the vector-Jacobian product of ``func``,
parameter-gradient flattening, and the backward sweep over output intervals."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode

from .._state import add_note
from .._types import FlatState, FlatTrajectory, Gradients, ParamGrads, Quadrature
from ..solvers import ButcherTableau, DenseStep, IntegrateResult, SolverConfig, integrate
from ..solvers.boundaries import merge_times
from ..solvers.loop import fixed_grid
from .base import Problem

__all__ = ["record_forward", "keep_every", "flat_param_grads", "unflatten_param_grads", "ParamGradSum", "VJP",
           "adjoint_sweep", "interval_config", "call_and_warn_unlisted", "gradient_scale", "adjoint_error_norm"]


def record_forward(prob: Problem, y0: FlatState, on_step: Callable[[DenseStep], Any] | None = None
                   ) -> IntegrateResult:
    """Forward solve from ``y0 (N,)`` without a graph, counting into ``prob.stats``."""
    nfe0 = prob.rhs.nfe
    res = integrate(prob.rhs, y0, prob.t_eval, prob.config, on_step=on_step)
    prob.stats.nfe_forward += prob.rhs.nfe - nfe0
    prob.stats.steps_forward += res.steps
    prob.stats.steps_rejected += res.rejected
    return res


def keep_every(every: int, out: list[FlatState]) -> Callable[[DenseStep], None]:
    """An ``on_step`` callback appending the start state of every ``every``-th accepted step to
    ``out`` (only those are ever referenced, so the others are freed during the forward)."""
    count = [0]

    def keep(step: DenseStep) -> None:
        if count[0] % every == 0:
            out.append(step.y0)
        count[0] += 1

    return keep


def flat_param_grads(grads: ParamGrads, params: Sequence[torch.Tensor]) -> Quadrature:
    """Concatenate per-parameter gradients (``None`` -> zeros) into one flat vector ``(Q,)``."""
    if not params:
        return torch.zeros(0)
    if len(params) == 1 and grads[0] is not None:  # one reshape, not a copy (called per evaluation)
        return grads[0].reshape(-1)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])


def unflatten_param_grads(flat: Quadrature | None, params: Sequence[torch.Tensor]
                          ) -> list[torch.Tensor | None]:
    """Inverse of :func:`flat_param_grads`; parameters that do not require grad get ``None``."""
    if flat is None or not params:
        return [None] * len(params)
    out: list[torch.Tensor | None] = []
    i = 0
    for p in params:
        n = p.numel()
        out.append(flat[i:i + n].view_as(p).to(p.dtype) if p.requires_grad else None)
        i += n
    return out


class ParamGradSum:
    """The running sum of per-segment parameter gradients (a backward that differentiates one
    segment at a time): what summing their :func:`flat_param_grads` vectors and
    :func:`unflatten_param_grads` of the sum give, bit for bit, without joining them per segment
    (a ``torch.cat`` of every parameter's gradient at every segment).

    The sum is kept per parameter, in the dtype the flat vector would have (the promotion of the
    parameters' dtypes), and a missing gradient adds zero, as its zeros would."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = tuple(params)
        self.dtype = None
        for p in self.params:
            self.dtype = p.dtype if self.dtype is None else torch.promote_types(self.dtype, p.dtype)
        self.sums: tuple[torch.Tensor, ...] | None = None

    def add(self, grads: ParamGrads) -> tuple[torch.Tensor, ...]:
        """Add one segment's gradients (``grads[i]`` shaped as ``params[i]``, or None); returns
        them as the sum took them (None as zeros), for a NaN/Inf check."""
        if self.sums is None:
            self.sums = tuple((g if g is not None else torch.zeros_like(p)).to(self.dtype, copy=True)
                              for g, p in zip(grads, self.params))
            # The segment's own gradients, not the sums that later segments add into in place: a
            # NaN/Inf check holding them must name the segment where it first appeared.
            return tuple(g if g is not None else p.new_zeros(()) for g, p in zip(grads, self.params))
        taken = []
        for acc, g in zip(self.sums, grads):
            if g is None:
                acc.add_(0.0)  # as the zeros would: -0.0 becomes 0.0
                taken.append(acc.new_zeros(()))
            else:
                acc.add_(g)
                taken.append(g)
        return tuple(taken)

    def result(self) -> list[torch.Tensor | None]:
        """The sums as ``dL/dp`` per parameter (its dtype; None where it does not require grad,
        or where nothing was added)."""
        if self.sums is None:
            return [None] * len(self.params)
        return [acc.to(p.dtype) if p.requires_grad else None for acc, p in zip(self.sums, self.params)]


def _leaves(fn, stop_nodes=frozenset(), limit=100_000):
    """AccumulateGrad leaves reachable from a grad_fn (bounded walk), not walking past
    ``stop_nodes`` (the grad_fns of listed non-leaf tensors: their gradient reaches their own
    leaves through autograd, outside the solve)."""
    seen, stack, leaves = set(), [fn], []
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or node in seen or node in stop_nodes:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


class _MadeInside(TorchFunctionMode):
    """While active, records the id of every tensor a torch function returns (other than one of
    its own arguments, as ``x.requires_grad_()`` returns ``x``): the tensors ``func`` makes
    itself. A captured tensor is alive before the call, so no tensor made during it shares its id."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, fn, types, args=(), kwargs=None):
        out = fn(*args, **(kwargs or {}))
        # The tensors themselves, not their ids: id() of a tensor cannot be traced when func is
        # torch.compile'd; the ids are taken after the call (self.ids).
        self.made.append(out)
        return out

    @property
    def ids(self) -> set:
        return {id(o) for out in self.made for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor)}


def call_and_warn_unlisted(f_of, state: torch.Tensor, params) -> torch.Tensor:
    """``f_of()`` (an evaluation of ``func`` with a graph), then a warning if it depends on a tensor
    requiring grad that is neither ``state`` nor in ``params`` (a memory-lean method would silently
    return no gradient for it; :func:`unlisted_tensors`), naming only tensors that ``func``
    captures: a leaf it makes during the call (FFJORD's ``t.clone().detach().requires_grad_(True)``)
    is nobody's parameter and needs no gradient.

    Some ways of making a tensor pass no torch function (``nn.Parameter(...)``, ``torch.from_numpy``,
    the legacy ``torch.Tensor([...])``). So where a leaf is left to name, ``func`` is evaluated once
    more (one more evaluation, on that path only): a captured leaf is the same object both times, a
    leaf made inside is a new one."""
    with _MadeInside() as made:
        out = f_of()
    missing = unlisted_tensors(out, state, params, made.ids)
    if missing:
        with _MadeInside() as made_again:
            again = f_of()
        # ``missing`` keeps its tensors alive, so no tensor of the second call can reuse their ids.
        seen_again = {id(v) for v in unlisted_tensors(again, state, params, made_again.ids)}
        missing = [v for v in missing if id(v) in seen_again]
    _warn_unlisted(missing, stacklevel=5)
    return out


def unlisted_tensors(out: torch.Tensor, state: torch.Tensor, params, made_inside=frozenset()) -> list:
    """The leaf tensors requiring grad that ``out`` (``func``'s output, computed with a graph)
    depends on and that are neither ``state`` nor in ``params`` nor made during the call (ids
    ``made_inside``)."""
    if out.grad_fn is None:
        return []
    known = {id(p) for p in params} | {id(state)} | set(made_inside)
    stop = frozenset(p.grad_fn for p in params if p.grad_fn is not None)
    return [v for v in _leaves(out.grad_fn, stop) if id(v) not in known]


def _warn_unlisted(missing: list, stacklevel: int) -> None:
    if missing:
        shapes = ", ".join(str(tuple(v.shape)) for v in missing[:5])
        warnings.warn(
            f"func uses {len(missing)} tensor(s) that require grad but are not in adjoint_params "
            f"(shapes {shapes}); they receive no gradient from this solve. Pass "
            "adjoint_params=(...) including them, or make func an nn.Module that owns them.",
            RuntimeWarning, stacklevel=stacklevel)


# torch.autograd.grad's argument checks (shapes, dtypes, ``sym_eq``) cost about half as much as
# the engine call itself on a small graph, and the backward sweeps make one call per segment or per
# evaluation (the forward's graph is walked by one). Where torch has it the engine is called
# directly: the gradients handed in are built here with their outputs' shapes.
_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _grad(outputs, inputs, grad_outputs, retain: bool) -> tuple:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True, retain_graph=retain)``
    (sequences of tensors; ``grad_outputs[i]`` shaped as ``outputs[i]``)."""
    if _run_backward is None:
        return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True, retain_graph=retain)
    return _run_backward(tuple(outputs), tuple(grad_outputs), retain, False, tuple(inputs), True,
                         accumulate_grad=False)


def grad_keeping_graph(outputs, inputs, grad_outputs, keep: bool) -> tuple:
    """``(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True), keep)``, keeping
    the graph while ``keep``: tensors ``func`` uses that were computed outside it from a listed
    tensor (a spline's coefficients, ``w = 2 p`` beside ``p``) have that graph walked at every call.
    A ``torch.compile``'d ``func``'s backward refuses to keep its graph (donated buffers); there the
    call is repeated without, and ``keep`` comes back False for the calls after it (its own graph
    is rebuilt at every call, so nothing is lost)."""
    if keep:
        try:
            return _grad(outputs, inputs, grad_outputs, True), True
        except RuntimeError as e:
            if "donated buffer" not in str(e):
                raise
    return _grad(outputs, inputs, grad_outputs, False), False


class VJP:
    """``(f, a^T df/dz, a^T df/dtheta)`` at ``(t, z)``: one evaluation of ``func`` plus one
    autograd backward through it. The first call checks that every leaf tensor ``func`` uses is in
    ``params`` and warns otherwise (those tensors would silently get no gradient)."""

    def __init__(self, prob: Problem):
        self.rhs, self.params = prob.rhs, tuple(prob.params)
        self.checked = False
        self.n_params = sum(p.numel() for p in self.params)
        # Each parameter tensor's integral is error-controlled on its own (torchdiffeq's default
        # adjoint norm does the same), so a small bias is not averaged away beside a large weight.
        self.q_splits = tuple(p.numel() for p in self.params)
        self.keep_graph = True  # see grad_keeping_graph

    def __call__(self, t: float, z: FlatState, a: FlatState) -> tuple[FlatState, FlatState, Quadrature]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            if self.checked:
                f = self.rhs(t, z)
            else:
                self.checked = True
                f = call_and_warn_unlisted(lambda: self.rhs(t, z), z, self.params)
            if f.requires_grad:
                try:
                    grads, self.keep_graph = grad_keeping_graph((f,), (z,) + self.params, (a,), self.keep_graph)
                except Exception as e:
                    add_note(e, f"raised while differentiating func at t={t:.6g} in the "
                                f"{self.rhs.context} with method '{self.rhs.method}'")
                    raise
            else:
                grads = (None,) * (1 + len(self.params))
        # With f = y, autograd hands ``a`` itself back as gz: callers pass a fresh ``-a`` and never
        # modify gz in place, so the aliasing is harmless.
        gz = grads[0] if grads[0] is not None else torch.zeros_like(z)
        gp = flat_param_grads(grads[1:], self.params) if self.params else z.new_zeros(0)
        return f.detach(), gz, gp


def gradient_scale(grad_ys: torch.Tensor, ord: float = math.inf) -> float:
    """The unit of an adjoint solve's absolute tolerance: a norm of the incoming gradients
    ``grad_ys`` (any shape; 1.0 where it is zero or not finite).

    The adjoint system ``[a, dL/dtheta]`` is linear in the incoming gradients, so measuring its
    ``atol`` in their units makes the gradient's relative accuracy independent of the loss's
    scale. With a fixed ``atol`` (torchdiffeq's choice) a loss whose gradients are small next to
    ``atol`` - e.g. ``y(T)**2`` of a decaying solution - gets gradients that are mostly solver noise
    (measured: relative error 2.2 at rtol=atol=1e-6 on a decay rate of 10).

    ``ord=inf`` (the largest entry) is the unit of the adjoint ``a``, entry by entry. ``ord=2`` is
    the unit of the parameter integral: ``dL/dtheta`` sums ``a_i df_i/dtheta`` over all ``N``
    entries, which add up to about ``sqrt(N)`` entries' worth where their signs are independent (a
    batch's samples) and to ``N`` where they agree, so the L2 norm is the smallest size it can be
    expected to reach. The largest entry is up to ``sqrt(N)`` times smaller still: with it, the
    mean loss of torchdiffeq's ``examples/cnf.py`` (512 samples) asked the parameter integral for
    absolute accuracy far below its own size, and the backward took 56 evaluations instead of 38
    at the same gradient error (benchmarks/README.md)."""
    s = float(torch.linalg.vector_norm(grad_ys, ord)) if grad_ys.numel() else 0.0
    return s if s > 0 and math.isfinite(s) else 1.0


def adjoint_error_norm(prob: Problem, config: SolverConfig, with_z: bool
                       ) -> Callable[[FlatState, Quadrature | None], Any] | None:
    """The backward solve's ``control.norm`` from ``control.adjoint_norm`` (torchdiffeq's convention:
    called with ``(t, *y_parts, *adj_y_parts, *adj_params)``, the scaled error estimates in the
    structures of the state and the parameters), or None for the built-in norm.

    The backward state is ``[z, a]`` (``with_z``) or ``a`` (z read from the forward: its error part
    is zero), the quadrature the flat parameter gradient. ``t`` is always 0: no method here
    integrates ``dL/dt_0`` (it comes from ``a(t_0) . f(t_0, y_0)``)."""
    user = config.control.adjoint_norm
    if user is None:
        return None
    spec, n = prob.spec, prob.spec.numel
    shapes = [p.shape for p in prob.params]
    numels = [p.numel() for p in prob.params]

    def parts(flat):
        v = spec.unflatten(flat)
        return tuple(v) if spec.is_tuple else (v,)

    def norm(e_state, e_q):
        z, a = (e_state[:n], e_state[n:]) if with_z else (torch.zeros_like(e_state), e_state)
        ps = () if e_q is None else tuple(v.view(s) for v, s in zip(e_q.split(numels), shapes))
        return user((e_state.new_zeros(()), *parts(z), *parts(a), *ps))

    return norm


def interval_config(config: SolverConfig, t_from: float, t_to: float, first_step: float | None = None
                    ) -> SolverConfig:
    """The solver configuration for one backward interval: a fixed grid restricted to it, and
    ``first_step`` (the step the previous interval's controller would take next) where the
    configuration sets none."""
    if first_step is not None and config.control.first_step is None:
        config = config.with_control(first_step=first_step)
    if config.time.grid is None:
        return config
    lo, hi = sorted((t_from, t_to))
    inner = [g for g in config.time.grid if lo < g < hi]
    inner.sort(reverse=t_to < t_from)
    return replace(config, time=replace(config.time, grid=[t_from] + inner + [t_to]))


class _PrefetchedZ:
    """``z(t)`` for a fixed-step backward solve, whose stage times are known before it starts:
    the source is evaluated for a chunk of steps' stage times at once (one batched evaluation,
    e.g. one matrix product of the interpolant) instead of once per stage. Other times are passed
    to the source one by one.

    Args:
        z_of: the source, a callable ``z(t) -> (N,)`` with ``evaluate_many(ts) -> (K, N)``.
        times: every stage time of the solve, in the order the solve asks for them.
        rows: how many to evaluate per batch (bounds the memory: ``rows * N`` entries).
    """

    def __init__(self, z_of, times: list, rows: int):
        self.z_of, self.times, self.rows = z_of, times, max(1, rows)
        self.index: dict[float, int] = {}
        for i, t in enumerate(times):
            self.index.setdefault(t, i)
        self.start = 0
        self.block: torch.Tensor | None = None

    def __call__(self, t: float) -> torch.Tensor:
        i = self.index.get(t)
        if i is None:
            return self.z_of(t)
        if self.block is None or not (self.start <= i < self.start + self.block.shape[0]):
            self.start = i
            self.block = self.z_of.evaluate_many(self.times[i:i + self.rows])
        return self.block[i - self.start]


# Batched z(t) evaluation holds up to this many entries (rows x N) at a time.
_PREFETCH_ENTRIES = 1 << 18


def _stage_times(cfg, t_from: float, t_to: float):
    """The times at which a fixed-step explicit Runge-Kutta solve from ``t_from`` to ``t_to``
    evaluates its right-hand side (computed as :func:`~pyode_bridge.solvers.rk_step` does), or
    None where they are not known in advance (adaptive steps, other solver families)."""
    tab = cfg.method
    if (cfg.adaptive or not isinstance(tab, ButcherTableau) or tab.implicit
            or cfg.time.grid_constructor is not None):
        return None
    grid = fixed_grid(cfg, [t_from, t_to], None, None, "backward pass")
    return [t + c * (t1 - t) for t, t1 in zip(grid, grid[1:]) for c in tab.c]


def adjoint_sweep(prob: Problem, grad_ys: FlatTrajectory,
                  z_for_interval: Callable[[float, float], Callable[[float], FlatState]] | FlatTrajectory,
                  extra_breaks: Sequence[float] = (), context: str = "backward pass", vjp: VJP | None = None,
                  after_interval: Callable[..., None] | None = None) -> Gradients:
    """Solve the adjoint ``[a, dL/dtheta]`` backwards over all output intervals.

    ``z_for_interval(t_lo, t_hi)`` returns a callable ``z(t)`` valid on that interval (interpolant,
    dense output, re-solved segment); if it also has ``evaluate_many(ts)``, a fixed-step backward
    solve reads it in batches of stage times. Backsolve passes the forward's outputs ``(T, N)``
    instead: ``z`` is solved backwards with the adjoint (the state is ``[z, a]``, each
    error-controlled on its own), restarting from the forward's output at every output time (as
    torchdiffeq). ``a`` jumps by ``grad_ys[i]`` at each output time.
    An adaptive backward solve carries its step size from one output interval to the next
    (instead of restarting the initial-step heuristic at each output time).

    ``vjp``: the products' evaluator (default a new :class:`VJP`). ``after_interval(t_hi, t_lo,
    state, q, last)`` is called at the end of every interval, before ``a``'s jump, with the
    backward state and parameter integral there and, where ``z`` is solved, the latest
    evaluation ``[t, state, vjp's products]`` (an FSAL step's last one is at the end state).
    Returns ``(grad_y0 (N,), [grad per param or None])`` and adds backward counters to ``prob.stats``.
    """
    t_eval = prob.t_eval
    breaks = merge_times(t_eval, extra_breaks)
    out_index = {t: i for i, t in enumerate(t_eval)}
    vjp = VJP(prob) if vjp is None else vjp
    nfe0 = prob.rhs.nfe
    a = grad_ys[-1].clone()
    N = a.numel()
    q: Quadrature | None = a.new_zeros(vjp.n_params)  # integrate hands q_end back as Optional
    # a and the parameter integral measure their atol in units of the incoming gradient (see
    # gradient_scale); a solved z keeps the state's.
    scale, q_scale = gradient_scale(grad_ys), gradient_scale(grad_ys, 2)
    state_scale: float | torch.Tensor = scale
    solving_z = isinstance(z_for_interval, torch.Tensor)
    config = prob.adjoint_config
    if solving_z:
        config = config.with_control(norm_splits=(config.control.norm_splits or (N,)) * 2)
        state_scale = torch.cat([a.new_ones(N), a.new_full((N,), scale)]) if scale != 1.0 else 1.0
    if config.control.adjoint_norm is not None:
        config = config.with_control(norm=adjoint_error_norm(prob, config, with_z=solving_z))
    z_of: Callable[[float], FlatState] | None = None  # this interval's z(t); None where z is solved
    last: list = []

    def rhs(t, s):
        # The products with -a, not an in-place negation of them, which for func = identity (or
        # y + p) are the incoming vector itself - the state integrate still holds.
        if z_of is not None:
            _, gz, gp = vjp(t, z_of(t), torch.neg(s))
            return gz, gp
        out = vjp(t, s[:N], torch.neg(s[N:]))
        last[:] = (t, s, out)
        return torch.cat(out[:2]), out[2]

    carried = None  # the step size the previous interval's controller would take next
    for k in range(len(breaks) - 1, 0, -1):
        t_hi, t_lo = breaks[k], breaks[k - 1]
        cfg = interval_config(config, t_hi, t_lo, carried)
        if isinstance(z_for_interval, torch.Tensor):
            state = torch.cat([z_for_interval[out_index[t_hi]], a])
        else:
            state, z_of = a, z_for_interval(t_lo, t_hi)
            times = _stage_times(cfg, t_hi, t_lo) if hasattr(z_of, "evaluate_many") else None
            if times is not None and len(times) > 1:
                z_of = _PrefetchedZ(z_of, times, _PREFETCH_ENTRIES // max(1, N))
        res = integrate(rhs, state, [t_hi, t_lo], cfg, q0=q, q_splits=vjp.q_splits, atol_scale=state_scale,
                        q_atol_scale=q_scale, context=context)
        state, q = res.ys[-1], res.q_end
        carried = res.next_step
        prob.stats.steps_backward += res.steps
        prob.stats.steps_backward_rejected += res.rejected
        if after_interval is not None:
            after_interval(t_hi, t_lo, state, q, last)
        a = state[N:] if solving_z else state
        if t_lo in out_index:
            a = a + grad_ys[out_index[t_lo]]
    prob.stats.nfe_backward += prob.rhs.nfe - nfe0
    return a, unflatten_param_grads(q, prob.params)

