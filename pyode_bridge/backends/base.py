"""What :func:`pyode_bridge.odeint` asks of a backend, and the two it has: a new backend is one
:class:`Backend` subclass registered in :data:`BACKENDS` (its solver in a subpackage of its own),
with no ``backend == ...`` branch elsewhere."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, Tuple

import torch

from .._state import FlatRHS, State, StateSpec
from .._time_grad import make_field
from ..sensitivity import Backprop, Problem, Sensitivity, resolve_sensitivity
from ..solvers import TABLEAUX, SolverConfig
from ..solvers.compiled import CompiledStep
from ..solvers.cuda_graph import check_cuda_graph, graphed_solve
from ..stats import SolveStats

__all__ = ["Prepared", "Backend", "TorchBackend", "JuliaBackend", "BACKENDS", "get_backend"]

FlatSolve = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Prepared:
    """A checked problem, parsed once (:func:`pyode_bridge._problem.prepare`), for a backend.

    ``func``, ``y0``, ``t`` are ``odeint``'s; ``t_eval`` the ``T`` times as floats; ``t_grad``:
    ``t`` requires grad in grad mode; ``sensitivity`` as ``backend.resolve_sensitivity`` gives it;
    ``native_method``: the backend's own method replacing ``config``'s, or None; ``params``: the
    tensors requiring grad that gradients are returned for, ``()`` when ``defer_params`` (autograd
    finds them; checked only if the solve fails); ``grad_needed``: grad mode is on and ``t``,
    ``y0`` or a listed parameter requires grad; ``stats``: reset.
    """

    func: Callable[..., Any]
    y0: State
    t: torch.Tensor | Sequence[float]
    spec: StateSpec
    t_eval: list
    t_grad: bool
    backend: Backend
    sensitivity: Any
    native_method: Any
    config: SolverConfig
    params: Tuple[torch.Tensor, ...]
    defer_params: bool
    grad_needed: bool
    stats: SolveStats

    def rhs(self, context: str = "forward solve") -> FlatRHS:
        """``func`` on flat states ``(N,) -> (N,)``, counting its evaluations (``context`` names
        the solve in its errors)."""
        return FlatRHS(self.func, self.spec, self.config.time.dtype, self.config.method.name,
                       context=context)

    def field(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``field(t_k (0-d), y_k (N,)) -> (N,)``, for the gradients with respect to times."""
        return make_field(self.func, self.spec, self.config.time.dtype, self.config.method.name)


class Backend(abc.ABC):
    """One way of solving a prepared problem.

    Attributes:
        name: the ``backend=`` string.
        default_sensitivity: the gradient method used when ``sensitivity=None``.
        accelerates: honours ``options["compile"]`` and ``options["cuda_graph"]``.
        finds_events: runs ``event_fn`` searches (which read the torch loop's dense output).
        solves_per_sample: runs per-sample mode (:mod:`pyode_bridge._per_sample`).
        models_memory: its gradient methods are :class:`~pyode_bridge.sensitivity.Sensitivity`
            objects that predict their own memory (:mod:`pyode_bridge.memory`).
    """

    name: ClassVar[str]
    default_sensitivity: ClassVar[str]
    accelerates: ClassVar[bool] = False
    finds_events: ClassVar[bool] = False
    models_memory: ClassVar[bool] = False
    solves_per_sample: ClassVar[bool] = False

    @abc.abstractmethod
    def resolve_sensitivity(self, sensitivity: Any) -> Any:
        """The gradient method to run, from ``odeint``'s ``sensitivity`` (None: the default)."""

    @abc.abstractmethod
    def through_autograd(self, sensitivity: Any) -> bool:
        """Whether the resolved ``sensitivity`` is autograd through the forward solve (then
        autograd finds ``func``'s parameters itself)."""

    @abc.abstractmethod
    def solves_backward(self, sensitivity: Any) -> bool:
        """Whether the resolved ``sensitivity`` runs backward solves (it reads the adjoint config)."""

    def split_method(self, method: Any) -> tuple[str | None, Any]:
        """``(name for make_config, the backend's own method or None)`` from ``method=``."""
        return method, None

    def check(self, config: SolverConfig, adjoint_config: SolverConfig) -> None:
        """Refuse options the backend cannot honour (a silently ignored option would change the
        result without notice); the default honours every option."""
        return None

    @abc.abstractmethod
    def solver(self, prep: Prepared, adjoint_config: SolverConfig, native_adjoint_method: Any) -> FlatSolve:
        """``solve(y0_flat (N,)) -> ys (T, N)`` for ``prep`` (``T = len(prep.t_eval) >= 2``),
        differentiable with respect to ``y0_flat`` and ``prep.params``."""


class TorchBackend(Backend):
    """The package's own solvers and gradient methods (:mod:`pyode_bridge.sensitivity`)."""

    name = "torch"
    default_sensitivity = "backprop"
    accelerates = True
    finds_events = True
    models_memory = True
    solves_per_sample = True

    def resolve_sensitivity(self, sensitivity: Any) -> Sensitivity:
        return resolve_sensitivity(self.default_sensitivity if sensitivity is None else sensitivity)

    def through_autograd(self, sensitivity: Any) -> bool:
        return bool(sensitivity.through_autograd)

    def solves_backward(self, sensitivity: Any) -> bool:
        return bool(sensitivity.solves_backward)

    def solver(self, prep: Prepared, adjoint_config: SolverConfig, native_adjoint_method: Any) -> FlatSolve:
        config, spec, stats = prep.config, prep.spec, prep.stats
        rhs = prep.rhs()
        if config.accel.compile is not None:
            # FlatRHS declares compiled as None (_state.py, another branch's area): the one place set.
            rhs.compiled = CompiledStep(prep.func, spec, config.time.dtype, config.accel.compile)
        strategy: Sensitivity = prep.sensitivity
        if config.accel.cuda_graph:
            check_cuda_graph(config, prep.t_eval, spec.device, strategy.name)
        if not prep.grad_needed and not strategy.through_autograd:
            # No gradient will be asked for: the plain solve is the cheapest forward for every method.
            strategy = Backprop()
        problem = Problem(rhs=rhs, spec=spec, t_eval=prep.t_eval, config=config, adjoint_config=adjoint_config,
                          params=() if strategy.through_autograd else prep.params, stats=stats)

        def solve(y0_flat: torch.Tensor) -> torch.Tensor:
            if config.accel.cuda_graph and prep.grad_needed:  # graphs for training; a plain solve otherwise
                graphed = graphed_solve(prep.func, spec, config, prep.t_eval, y0_flat)
                ys = graphed.solve(y0_flat)
                stats.nfe_forward += graphed.nfe
                stats.steps_forward += graphed.steps
                return ys
            return strategy.solve(problem, y0_flat)

        return solve


class JuliaBackend(Backend):
    """SciML through juliacall (:mod:`pyode_bridge.backends.julia`), imported at the first solve:
    defining this class starts nothing, and a missing Julia is reported by that solve."""

    name = "julia"
    default_sensitivity = "gauss"

    def resolve_sensitivity(self, sensitivity: Any) -> Any:
        # Resolved by the julia package itself, at the solve (strings or JuliaSensitivity objects).
        return self.default_sensitivity if sensitivity is None else sensitivity

    def through_autograd(self, sensitivity: Any) -> bool:
        return False

    def solves_backward(self, sensitivity: Any) -> bool:
        return True

    def split_method(self, method: Any) -> tuple[str | None, Any]:
        # OrdinaryDiffEq names ("Vern7", "Rodas5P", ...) pass through; the backend validates them.
        if method is not None and method not in TABLEAUX:
            return None, method
        return method, None

    def check(self, config: SolverConfig, adjoint_config: SolverConfig) -> None:
        bad = []
        for name, cfg in (("options", config), ("adjoint_options", adjoint_config)):
            c, time = cfg.control, cfg.time
            for key, set_ in (("norm", c.norm is not None or c.adjoint_norm is not None),
                              ("perturb", time.perturb), ("grid_constructor", time.grid_constructor is not None),
                              ("step_t", bool(time.step_t)), ("jump_t", bool(time.jump_t)),
                              ("min_step", c.min_step > 0), ("interp", cfg.interp is not None)):
                if set_:
                    bad.append(f"{name}[{key!r}]")
        if config.callbacks or adjoint_config.callbacks:
            bad.append("step callbacks on func (callback_step, ...)")
        if bad:
            raise ValueError(f"backend='julia' does not support {', '.join(dict.fromkeys(bad))}; use "
                             "backend='torch' for them")

    def solver(self, prep: Prepared, adjoint_config: SolverConfig, native_adjoint_method: Any) -> FlatSolve:
        from .julia import odeint_julia

        spec = prep.spec

        def solve(y0_flat: torch.Tensor) -> torch.Tensor:
            out = odeint_julia(prep.func, spec.unflatten(y0_flat), prep.t, spec=spec, t_eval=prep.t_eval,
                               config=prep.config, adjoint_config=adjoint_config,
                               sensitivity=prep.sensitivity, params=prep.params, stats=prep.stats,
                               julia_method=prep.native_method, julia_adjoint_method=native_adjoint_method)
            return spec.flatten_time(out)

        return solve


BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), JuliaBackend())}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``odeint``'s ``backend=``)."""
    if not isinstance(name, str) or name not in BACKENDS:  # a list would not hash
        raise ValueError(f"unknown backend {name!r}; use one of {list(BACKENDS)}")
    return BACKENDS[name]

