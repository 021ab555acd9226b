"""``ODEBlock``: an ``nn.Module`` layer ``x -> z(t1)`` with ``dz/dt = func(t, z)``, ``z(t0) = x``."""
from __future__ import annotations

import torch
from torch import nn

from ..odeint import odeint
from ..stats import SolveStats

__all__ = ["ODEBlock", "collect_stats", "ode_blocks"]


class ODEBlock(nn.Module):
    """A neural-ODE layer: returns the solution of ``dz/dt = func(t, z)``, ``z(t[0]) = x`` at ``t[-1]``.

    Works as an ordinary layer: inside ``nn.Sequential``, under ``train()``/``eval()`` (it has no
    mode-dependent behaviour of its own; ``func``'s layers follow the mode), with ``state_dict``
    save/load, ``.to(device)``/``.double()`` (the time span is a buffer) and
    ``DistributedDataParallel``. Under ``torch.no_grad()`` every gradient method runs the plain solve.

    Args:
        func: ``func(t, z) -> dz/dt`` (``t`` a 0-d tensor). Registered as the submodule ``func``
            when it is an ``nn.Module``, so its parameters train, move and save with the block.
        t: times ``(t0, ..., t1)``; the block integrates over all of them and returns the state at
            the last (more than two times only matter for ``Interpolated``/``Checkpointed`` output
            intervals, or with ``return_trajectory=True``). Default ``(0, 1)``.
        method: solver (``"dopri5"`` default; fixed-step ``"euler"``, ``"midpoint"``, ``"rk4"``).
        rtol, atol: tolerances of adaptive methods. Default ``1e-3`` both: a classifier needs the
            map ``x -> z(1)`` to be a smooth, trainable function, not an accurate ODE solution
            (torchdiffeq's ``odenet_mnist`` and the IRDM CIFAR-10 runs use ``1e-3``); lower them
            for density models (FFJORD uses ``1e-5``).
        sensitivity: gradient method, ``"backprop"`` (the default on the torch backend; the julia
            backend's default is ``"gauss"``), ``"checkpointed"``,
            ``"interpolated"``, ``"interpolating"``, ``"backsolve"`` or an instance
            (``pob.Interpolated(nodes=8)``).
        options: solver options passed to :func:`pyode_bridge.odeint` (``step_size``, ``grid``,
            ``max_num_steps``, ...).
        steps: the number of equal steps over ``[t0, t1]`` (ANODE's ``Nt``) for fixed-step
            methods; sets ``options["step_size"]`` (with an adaptive tableau it forces that grid).
        backend: ``"torch"`` or ``"julia"``.
        adjoint_params: tensors to differentiate with the memory-lean methods (default: the
            parameters of ``func`` when it is a module).
        return_trajectory: return the states at every time of ``t`` (``(T, *S)``) instead of the
            last one.
        **odeint_kwargs: further keywords of :func:`pyode_bridge.odeint` (``adjoint_rtol``, ...).

    Attributes:
        t_span: buffer ``(T,)`` of the integration times (in ``state_dict`` as ``"t_span"``).
        stats: :class:`~pyode_bridge.SolveStats` of the last forward call (a fresh object per call;
            its backward counters fill in when that call's ``.backward()`` runs).

    Shapes:
        ``forward(x)``: ``x`` a tensor ``S`` -> ``S``, or a tuple of tensors -> the same tuple
        structure (e.g. a CNF's ``(z, logp)``). With ``return_trajectory``: ``(T, *S)``.
    """

    t_span: torch.Tensor  # a registered buffer (nn.Module's __getattr__ would type it as Tensor | Module)

    def __init__(self, func, t=(0.0, 1.0), method: str = "dopri5", rtol: float = 1e-3,
                 atol: float = 1e-3, sensitivity=None, options: dict | None = None,
                 steps: int | None = None, backend: str = "torch", adjoint_params=None,
                 return_trajectory: bool = False, **odeint_kwargs):
        super().__init__()
        # Assigning a Module registers it; a plain callable is kept as an attribute.
        self.func = func
        t = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, torch.Tensor) \
            else t.detach().clone()
        if t.dim() == 2:
            raise ValueError(f"ODEBlock(t=...) takes one time span for every input (1-D), got shape "
                             f"{tuple(t.shape)}; for each sample's own times call pyode_bridge.odeint with "
                             "a 2-D t (B, T), or give the block options={'step_control': 'per_sample'} "
                             "(one span, each row its own steps)")
        if t.dim() != 1 or t.numel() < 2:
            raise ValueError(f"ODEBlock(t=...) needs at least two times (t0, t1), got {t.tolist()}")
        self.register_buffer("t_span", t)
        self.method, self.rtol, self.atol = method, rtol, atol
        self.sensitivity = sensitivity
        self.options = dict(options or {})
        if steps is not None:
            if int(steps) < 1:
                raise ValueError(f"ODEBlock(steps={steps}): steps must be a positive integer")
            self.options["step_size"] = abs(float(t[-1] - t[0])) / int(steps)
        self.steps = steps
        self.backend = backend
        self.adjoint_params = None if adjoint_params is None else tuple(adjoint_params)
        self.return_trajectory = bool(return_trajectory)
        self.odeint_kwargs = odeint_kwargs
        self.stats = SolveStats()

    @property
    def nfe(self) -> int:
        """Right-hand side evaluations of the last forward solve."""
        return self.stats.nfe_forward

    @property
    def nfe_backward(self) -> int:
        """Right-hand side evaluations (or vector-Jacobian products) of the last call's backward."""
        return self.stats.nfe_backward

    def forward(self, x):
        """Solve from ``x`` over ``t_span``.

        Args:
            x: the initial state, a tensor of shape ``S`` (e.g. ``(B, C, H, W)``) or a tuple.

        Returns:
            The state at the final time (shape ``S``), or the trajectory ``(T, *S)`` when the block
            was built with ``return_trajectory=True``. ``self.stats`` holds this call's counters.
        """
        stats = SolveStats()
        self.stats = stats
        ys = odeint(self.func, x, self.t_span, rtol=self.rtol, atol=self.atol, method=self.method,
                    options=self.options or None, sensitivity=self.sensitivity, stats=stats,
                    backend=self.backend, adjoint_params=self.adjoint_params, **self.odeint_kwargs)
        if self.return_trajectory:
            return ys
        if isinstance(ys, tuple):
            return tuple(y[-1] for y in ys)
        return ys[-1]

    def extra_repr(self) -> str:
        sens = self.sensitivity
        sens = "default" if sens is None else sens if isinstance(sens, str) else type(sens).__name__
        span = ", ".join(f"{v:g}" for v in self.t_span.tolist())
        fixed = f", steps={self.steps}" if self.steps is not None else ""
        tol = "" if fixed else f", rtol={self.rtol:g}, atol={self.atol:g}"
        return f"t=({span}), method={self.method!r}{fixed}{tol}, sensitivity={sens!r}"


def ode_blocks(module: nn.Module) -> list:
    """Every :class:`ODEBlock` inside ``module`` (itself included), in registration order.

    Sees through ``DistributedDataParallel``/``DataParallel`` wrappers (they register the model as
    ``.module``).
    """
    return [m for m in module.modules() if isinstance(m, ODEBlock)]


def collect_stats(module: nn.Module) -> SolveStats:
    """The summed :class:`~pyode_bridge.SolveStats` of the last call of every ODE block in ``module``.

    ``nfe_forward``/``steps_forward`` are available after a forward, the backward counters after
    ``.backward()``.
    """
    total = SolveStats()
    for block in ode_blocks(module):
        total.merge_from(block.stats)
    return total
