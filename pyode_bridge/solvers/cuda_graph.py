"""Fixed-grid solves captured as CUDA graphs: ``odeint(..., options={"cuda_graph": True})``.

A fixed-step solve of a small vector field on a GPU is bound by kernel launches (each step is
tens of tiny kernels, each a few microseconds to launch) rather than by arithmetic. Its whole
sequence of steps is known in advance (the grid, the outputs on it), so the solve - every step,
forward and backward - can be captured once with :func:`torch.cuda.make_graphed_callables` and
replayed as two graph launches per training iteration.

Requirements (each checked, with an error naming it): a CUDA state; a fixed grid (a fixed-step
method, or ``step_size``/``grid`` with an adaptive tableau) of an explicit Runge-Kutta method;
every output time on the grid; ``sensitivity="backprop"`` (the default) with grad enabled (a
solve under ``torch.no_grad`` runs eagerly). ``func`` must be capturable: no host syncs
(``.item()``, printing tensors), no CPU tensors created per call, the same kernels every call.
The graphs are cached per ``func``, grid, output times, state shape, dtype and device: the first
solve warms up and captures (a few eager solves' time), later ones replay. Parameters are read
from their memory at replay, so in-place optimizer updates are seen; a parameter replaced by a
new tensor is not (the cache keys on ``func``, so build a new func for new parameter objects).
NaN/Inf is checked once per solve, on the outputs (one host sync).
"""
from __future__ import annotations

import bisect
import math
import weakref
from typing import cast

import torch
from torch import nn

from .._state import FlatRHS, find_parameters
from ..errors import SolverError
from .loop import make_grid, rk_step
from .tableau import ButcherTableau

__all__ = ["GraphedSolve", "graphed_solve", "check_cuda_graph"]


def check_cuda_graph(config, t_eval: list, device, sensitivity_name: str) -> None:
    """Raise ``ValueError`` naming what ``options={"cuda_graph": True}`` needs and is missing."""
    tab = config.method
    if not isinstance(tab, ButcherTableau) or tab.implicit:
        raise ValueError(f"options['cuda_graph'] captures explicit Runge-Kutta steps; method "
                         f"{getattr(tab, 'name', tab)!r} has steps of its own")
    if config.adaptive:
        raise ValueError("options['cuda_graph'] needs a fixed grid: use a fixed-step method ('rk4') or "
                         "pass options={'step_size': h} (or 'grid')")
    if device.type != "cuda":
        raise ValueError(f"options['cuda_graph'] needs a CUDA state, got y0 on {device}; drop it on "
                         "the CPU (or use options={'compile': True})")
    if sensitivity_name != "backprop":
        raise ValueError(f"options['cuda_graph'] graphs the backprop solve; sensitivity="
                         f"{sensitivity_name!r} has a backward of its own: use sensitivity='backprop'")
    g = config.time
    moved = [name for name, on in (("perturb", g.perturb), ("jump_t", bool(g.jump_t)),
                                   ("grid_constructor", g.grid_constructor is not None),
                                   ("step callbacks", bool(config.callbacks))) if on]
    if moved:
        raise ValueError(f"options['cuda_graph'] captures plain fixed steps; it does not combine with "
                         f"{', '.join(moved)}: drop those or 'cuda_graph'")
    if config.accel.compile is not None:
        raise ValueError("options['cuda_graph'] and options['compile'] are exclusive; for CUDA graphs "
                         "of the compiled step use options={'compile': {'mode': 'reduce-overhead'}}")
    grid = make_grid(t_eval[0], t_eval[-1], config.time.step_size, config.time.grid, t_eval,
                     stops=config.time.step_t, max_num_steps=config.control.max_num_steps, method=config.method)
    steps = output_steps(grid, t_eval)
    if steps is None:
        off = next(t for t in t_eval[1:] if output_steps(grid, [t_eval[0], t]) is None)
        raise ValueError(f"options['cuda_graph'] needs every output time on the step grid; "
                         f"t={off:.6g} falls inside a step: pass options={{'grid': ...}} that "
                         "includes the output times")


def output_steps(grid: list, t_eval: list):
    """Per step of ``grid``: how many output times land on its end point, or None if one lands
    on no grid point. "On" allows a few ulps: ``k * step_size`` and a user's time rarely agree to
    the last bit (the eager solve then reads the dense output a hair before the grid point)."""
    sign = 1.0 if grid[-1] >= grid[0] else -1.0
    keys = [sign * g for g in grid]
    tol = 8 * math.ulp(max(abs(grid[0]), abs(grid[-1]), abs(grid[-1] - grid[0])))
    counts = [0] * (len(grid) - 1)
    for t in t_eval[1:]:
        j = bisect.bisect_left(keys, sign * t)
        near = [i for i in (j - 1, j) if 0 < i < len(grid) and abs(grid[i] - t) <= tol]
        if not near:
            return None
        counts[near[-1] - 1] += 1
    return counts


class _Solve(nn.Module):
    """The fixed-grid solve as a module whose parameters are ``func``'s (the same tensors), so
    the captured backward returns their gradients."""

    def __init__(self, rhs: FlatRHS, tab, grid: list, out_steps: list, config, params):
        super().__init__()
        self.rhs, self.tab, self.grid, self.out_steps, self.config = rhs, tab, grid, out_steps, config
        self.params = nn.ParameterList(params)

    def forward(self, y0):
        rhs, tab = self.rhs, self.tab
        y, f, outs = y0, None, [y0]
        for k in range(len(self.grid) - 1):
            t, t1 = self.grid[k], self.grid[k + 1]
            if f is None:
                f = rhs(t, y)
            y, _, _, f_new = rk_step(rhs, tab, t, y, f, t1 - t, config=self.config)
            f = f_new if tab.fsal else None
            for _ in range(self.out_steps[k]):
                outs.append(y)
        return torch.stack(outs)


class GraphedSolve:
    """One captured fixed-grid solve: ``solve(y0 (N,)) -> ys (T, N)``, differentiable w.r.t.
    ``y0`` and ``func``'s parameters through the captured backward graph.

    Args:
        func, spec, config, t_eval: as in :func:`~pyode_bridge.odeint` (validated first with
            :func:`check_cuda_graph`).
        y0_like: a flat state with the solve's shape, dtype, device and ``requires_grad``.
    """

    def __init__(self, func, spec, config, t_eval: list, y0_like: torch.Tensor):
        grid = make_grid(t_eval[0], t_eval[-1], config.time.step_size, config.time.grid, t_eval,
                         stops=config.time.step_t)
        out_steps = output_steps(grid, t_eval)
        self.rhs = FlatRHS(func, spec, config.time.dtype, config.method.name)
        params = find_parameters(func)
        loose = [p for p in params if not isinstance(p, nn.Parameter)]
        if loose:
            # The captured backward returns gradients for module parameters only: a plain tensor
            # would silently get none.
            raise ValueError(f"options['cuda_graph'] returns gradients for nn.Parameters; func uses "
                             f"{len(loose)} other tensor(s) requiring grad (shapes "
                             f"{[tuple(p.shape) for p in loose[:5]]}): make them nn.Parameters of "
                             "an nn.Module func, or drop 'cuda_graph'")
        self.module = _Solve(self.rhs, config.method, grid, out_steps, config, params)
        self.steps = len(grid) - 1
        sample = y0_like.detach().clone().requires_grad_(y0_like.requires_grad)
        # One Module in, the same Module (graphed) out; the stub's return type covers every input.
        self.graphed = cast(nn.Module, torch.cuda.make_graphed_callables(self.module, (sample,)))
        # Evaluations per solve (the warm-up and capture ran the Python loop; replays do not).
        self.nfe = self.steps * (tab_stages(config.method)) + (1 if config.method.fsal else 0)

    def solve(self, y0: torch.Tensor) -> torch.Tensor:
        # The graph's output buffer is reused by the next replay: hand out a copy.
        ys = self.graphed(y0).clone()
        self.rhs.nfe += self.nfe
        if not bool(torch.isfinite(ys).all()):
            raise SolverError(f"forward solve with method '{self.module.tab.name}' (cuda_graph): the "
                              "solution became NaN/Inf; use a smaller step_size, or check func")
        return ys


def tab_stages(tab: ButcherTableau) -> int:
    """Evaluations per step of a fixed-grid solve (an FSAL tableau reuses its last stage)."""
    return tab.stages - 1 if tab.fsal else tab.stages


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graphed_solve(func, spec, config, t_eval: list, y0_flat: torch.Tensor) -> GraphedSolve:
    """The cached :class:`GraphedSolve` for this ``func``, grid, output times and state (captured
    on first use)."""
    key = (config.method.name, config.time.step_size, tuple(config.time.grid or ()), tuple(t_eval),
           tuple(y0_flat.shape), y0_flat.dtype, str(y0_flat.device), y0_flat.requires_grad,
           config.time.dtype)
    try:
        per_func = _CACHE.setdefault(func, {})
    except TypeError:  # not weak-referenceable: no cache, capture every time
        per_func = {}
    g = per_func.get(key)
    if g is None:
        if len(per_func) >= 8:
            per_func.clear()
        g = per_func[key] = GraphedSolve(func, spec, config, t_eval, y0_flat)
    return g
