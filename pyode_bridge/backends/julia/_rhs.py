"""The PyTorch right-hand side as Julia calls it: flat parameters, callbacks, VJPs.

Julia holds the parameters as one flat vector ``p``. :class:`FlatParams` maps between it and the
parameter tensors. :class:`TorchRHS` provides the callbacks of ``PyodeBridge.PyRHS``:

- ``forward(du, u, p, t)``: ``f`` without a graph, into Julia's buffer ``du``;
- ``forward_graph(du, u, p, t) -> token``: ``f`` with the autograd graph kept;
- ``pullback(token, lam, gu, gp)``: one ``torch.autograd.grad`` for ``(df/du)^T lam`` and
  ``(df/dp)^T lam`` together, freeing the graph (the ``rrule`` fallback);
- ``vjp(du, gu, gp, lam, u, p, t)``: ``f`` and the wanted products (``gu``/``gp`` None when not
  wanted) from one torch forward and one ``torch.autograd.grad`` (the ``ODEFunction``'s
  ``vjp``/``vjp_p`` hooks that SciMLSensitivity calls);
- ``jac(J, u, p, t)`` and ``tgrad(dT, u, p, t)`` for implicit methods.

When ``func`` is an ``nn.Module`` and every parameter is one of its own, ``f`` is evaluated with
``torch.func.functional_call`` on views of ``p`` (so the values Julia passes are the values
used, and the gradient flows to ``p``). Otherwise (closures, bound methods) ``func`` runs with its
live parameters, which hold the same values as ``p`` (Julia never changes ``p``), and the
gradient is taken with respect to them.

An exception raised in a callback is remembered (:attr:`TorchRHS.error`) and re-raised by the
caller in place of the Julia error that wraps it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..._state import SolveContext, StateSpec
from ._handoff import julia_view, sync, write

__all__ = ["FlatParams", "TorchRHS"]


class FlatParams:
    """A tuple of parameter tensors as one flat vector, and back."""

    def __init__(self, params):
        self.params = tuple(params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)

    def flatten(self, tensors=None, *, dtype=None, device=None) -> torch.Tensor:
        """The parameters (or ``tensors`` of the same shapes) as one detached flat vector."""
        tensors = self.params if tensors is None else tuple(tensors)
        if not tensors:
            return torch.zeros(0, dtype=dtype or torch.float64, device=device)
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> tuple:
        """Views of ``flat`` with the parameters' shapes."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat parameter vector has {flat.numel()} entries, expected {self.numel}")
        return tuple(c.view(s) for c, s in zip(flat.split(self.numels), self.shapes))

    def flatten_grads(self, grads, like: torch.Tensor) -> torch.Tensor:
        """Gradients (None meaning zero) as one flat vector with ``like``'s dtype and device."""
        if not self.params:
            return like.new_zeros(0)
        return torch.cat([like.new_zeros(n) if g is None else g.reshape(-1)
                          for g, n in zip(grads, self.numels)])


def _module_names(func, params) -> list | None:
    """Names of ``params`` in ``func`` when ``func`` is an ``nn.Module`` owning all of them."""
    if not isinstance(func, nn.Module) or not params:
        return None
    by_id = {id(p): name for name, p in func.named_parameters()}
    names = [by_id.get(id(p)) for p in params]
    return None if any(n is None for n in names) else names


class TorchRHS(SolveContext):
    """The callbacks of ``PyodeBridge.PyRHS`` for ``func(t, y)`` on states described by ``spec``."""

    def __init__(self, func, spec: StateSpec, params, time_dtype: torch.dtype | None, method: str):
        self.func, self.spec, self.method = func, spec, method
        self.time_dtype = time_dtype or spec.dtype
        self.flat = FlatParams(params)
        self.names = _module_names(func, self.flat.params)
        self.context = "forward solve (backend='julia')"
        self.nfe = 0
        self.nvjp = 0
        self.error: BaseException | None = None
        self._graphs: dict = {}
        self._token = 0

    @property
    def functional(self) -> bool:
        """True when ``f`` is evaluated on the ``p`` Julia passes (``functional_call``)."""
        return self.names is not None

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, t: float, y: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        """``f(t, y)`` as a flat vector, with the parameters in ``p`` when :attr:`functional`."""
        tt = torch.full((), t, dtype=self.time_dtype, device=y.device)
        return self._call(tt, y, p, t)

    def _call(self, tt: torch.Tensor, y: torch.Tensor, p: torch.Tensor | None, t: float):
        state = self.spec.unflatten(y)
        if self.names is not None and p is not None:
            mapping = dict(zip(self.names, self.flat.unflatten(p)))
            out = torch.func.functional_call(self.func, mapping, (tt, state))
        else:
            out = self.func(tt, state)
        return self.spec.check_output(out, t, self.method, self.context)

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise

    # -- callbacks (arguments are Julia arrays) ---------------------------------------------

    def forward(self, du, u, p, t):
        return self._guard(self._forward, du, u, p, t)

    def _forward(self, du, u, p, t):
        self.nfe += 1
        y = julia_view(u)
        if y.is_cuda:
            # a CUDA view of Julia memory lives only as long as this call: func may keep its input
            y = y.clone()
        with torch.no_grad():
            out = self.evaluate(float(t), y, julia_view(p) if self.functional else None)
        write(du, out)
        sync(y.device)

    def forward_graph(self, du, u, p, t) -> int:
        return self._guard(self._forward_graph, du, u, p, t)

    def _forward_graph(self, du, u, p, t) -> int:
        self.nvjp += 1
        # Copies: the graph must not depend on Julia buffers that the solver may reuse.
        y = julia_view(u).clone().requires_grad_(True)
        pv = julia_view(p).clone().requires_grad_(True) if self.functional else None
        with torch.enable_grad():
            out = self.evaluate(float(t), y, pv)
        write(du, out)
        sync(y.device)
        self._token += 1
        self._graphs[self._token] = (y, pv, out)
        return self._token

    def pullback(self, token, lam, gu, gp):
        return self._guard(self._pullback, token, lam, gu, gp)

    def _pullback(self, token, lam, gu, gp):
        y, pv, out = self._graphs.pop(int(token))
        lam_t = julia_view(lam).reshape(out.shape).to(out.dtype)
        if pv is not None:
            inputs = (y, pv) if pv.numel() else (y,)
        else:
            inputs = (y, *[q for q in self.flat.params if q.requires_grad])
        grads = torch.autograd.grad(out, inputs, lam_t, allow_unused=True)
        g_y = grads[0] if grads[0] is not None else torch.zeros_like(y)
        if pv is not None:
            g_p = grads[1] if len(grads) > 1 and grads[1] is not None else torch.zeros_like(pv)
        else:
            rest = iter(grads[1:])
            g_p = self.flat.flatten_grads(
                [next(rest) if q.requires_grad else None for q in self.flat.params], like=y)
        write(gu, g_y)
        write(gp, g_p)
        sync(y.device)

    def vjp(self, du, gu, gp, lam, u, p, t):
        return self._guard(self._vjp, du, gu, gp, lam, u, p, t)

    def _vjp(self, du, gu, gp, lam, u, p, t):
        self.nvjp += 1
        y = julia_view(u).clone().requires_grad_(gu is not None)
        pv = julia_view(p).clone().requires_grad_(gp is not None) if self.functional else None
        with torch.enable_grad():
            out = self.evaluate(float(t), y, pv)
        inputs = [y] if gu is not None else []
        if gp is not None:
            if pv is not None:
                inputs.append(pv)
            else:
                inputs += [q for q in self.flat.params if q.requires_grad]
        grads = [None] * len(inputs)
        if inputs and out.requires_grad:
            lam_t = julia_view(lam).reshape(out.shape).to(out.dtype)
            grads = list(torch.autograd.grad(out, inputs, lam_t, allow_unused=True))
        write(du, out)
        if gu is not None:
            g_y = grads.pop(0)
            write(gu, torch.zeros_like(y) if g_y is None else g_y)
        if gp is not None:
            if pv is not None:
                g_p = grads[0] if grads and grads[0] is not None else torch.zeros_like(pv)
            else:
                rest = iter(grads)
                g_p = self.flat.flatten_grads(
                    [next(rest) if q.requires_grad else None for q in self.flat.params], like=y)
            write(gp, g_p)
        sync(y.device)

    def jac(self, J, u, p, t):
        return self._guard(self._jac, J, u, p, t)

    def _jac(self, J, u, p, t):
        self.nfe += 1
        y = julia_view(u).clone()
        pv = julia_view(p).clone() if self.functional else None
        jac = torch.autograd.functional.jacobian(lambda yy: self.evaluate(float(t), yy, pv), y)
        write(J, jac)
        sync(y.device)

    def tgrad(self, dT, u, p, t):
        return self._guard(self._tgrad, dT, u, p, t)

    def _tgrad(self, dT, u, p, t):
        self.nfe += 1
        y = julia_view(u).clone()
        pv = julia_view(p).clone() if self.functional else None
        t0 = torch.full((), float(t), dtype=self.time_dtype, device=y.device)
        _, dfdt = torch.autograd.functional.jvp(lambda tt: self._call(tt, y, pv, float(t)), t0,
                                                torch.ones_like(t0))
        write(dT, dfdt)
        sync(y.device)

    def release(self) -> None:
        """Drop any graph kept by ``forward_graph`` whose pullback never came."""
        self._graphs.clear()
