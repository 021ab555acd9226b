"""Step-size control: error norm, PI controller and the initial step heuristic."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = ["PIController", "error_ratio", "quadrature_error_ratio", "initial_step"]


def error_ratio(err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, rtol: float,
                atol: float | torch.Tensor, splits: Sequence[int] | None = None) -> torch.Tensor:
    """RMS of ``err / (atol + rtol * max(|y0|, |y1|))`` as a 0-d tensor (no host sync).

    ``atol`` is a float or a tensor broadcastable to ``err`` (per-component tolerances).

    With ``splits`` (the sizes of a tuple state's parts) it is the largest of the parts' RMS
    values, so a small part (a CNF's ``logp`` beside ``z``) is controlled on its own instead of
    being averaged away (torchdiffeq's mixed norm does the same).
    """
    with torch.no_grad():
        if not splits or len(splits) == 1:
            # The RMS's 1/sqrt(N) folded into the scale: one operation fewer per step.
            root_n = math.sqrt(err.numel())
            scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol * root_n)
            if isinstance(atol, float):
                scale.add_(atol * root_n)
            else:  # per-component tolerances (N,)
                scale.add_(atol, alpha=root_n)
            return torch.linalg.vector_norm(err / scale)
        scaled = err / torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        return torch.stack([torch.linalg.vector_norm(p) / math.sqrt(p.numel())
                            for p in scaled.split(list(splits))]).max()


def quadrature_error_ratio(err: torch.Tensor, q0: torch.Tensor, q1: torch.Tensor, rtol: float,
                           atol: float, splits: Sequence[int] | None = None) -> torch.Tensor:
    """Error ratio of an integrated quadrature (an adjoint's parameter gradient), 0-d tensor.

    Each part (one parameter tensor) is measured relative to its own largest entry:
    RMS of ``err`` over ``atol + rtol * max(|q0|, |q1|)`` taken over the part. An entry-wise scale
    would demand absolute accuracy ``atol`` of the entries that happen to be near zero, which for
    a conv layer's weight gradient cost 44 backward evaluations instead of 20 at no gain in the
    gradient's accuracy relative to its size (the aim)."""
    with torch.no_grad():
        parts = list(splits) if splits else [err.numel()]
        ratios = []
        for e, a, b in zip(err.split(parts), q0.split(parts), q1.split(parts)):
            scale = torch.maximum(a.abs().max(), b.abs().max()) * rtol + atol
            ratios.append(torch.linalg.vector_norm(e) / math.sqrt(e.numel()) / scale)
        return ratios[0] if len(ratios) == 1 else torch.stack(ratios).max()


class PIController:
    """Proportional-integral step-size controller (Hairer, Norsett & Wanner II.4; Gustafsson).

    ``h_new = h * clamp(s * r**(-alpha) * r_prev**beta, dfactor, ifactor)`` where ``r`` is the
    error ratio of the current step and ``r_prev`` that of the last accepted one. ``beta = 0.2 / k``
    and ``alpha = 1/k - 0.75 beta`` (``k`` = error order), which for dopri5 are Hairer's 0.04 / 0.17.
    Until the first step is accepted there is no ``r_prev`` and the factor is
    ``safety * r**(-1/k)`` (integral control).

    Both aim at the error ratio ``safety**k`` (0.59 for dopri5, 0.81 for adaptive_heun): the PI
    factor's ``s = safety**(k * (alpha - beta))`` puts its fixed point ``r = r_prev`` there.
    Hairer's ``s = safety`` puts it at ``safety**(1 / (alpha - beta))`` instead (0.44 for dopri5,
    0.27 for dopri8): steps 10-15% shorter than the integral controller's (torchdiffeq's) at the
    same tolerance, for a matching gain in accuracy, so at equal rtol/atol more evaluations than
    torchdiffeq for the same work-precision curve (benchmarks/README.md, "Work-precision").

    A rejected step is never increased, and neither is the step that follows a rejection once it
    is accepted (Hairer's ``facmax = 1`` after a rejection, as scipy does): growing right after a
    failure tends to fail again.
    """

    def __init__(self, error_order: int, *, safety: float = 0.9, ifactor: float = 10.0,
                 dfactor: float = 0.2, beta: float | None = None, max_step: float = math.inf) -> None:
        self.beta = 0.2 / error_order if beta is None else float(beta)
        self.alpha = 1.0 / error_order - 0.75 * self.beta
        self.safety, self.ifactor, self.dfactor, self.max_step = safety, ifactor, dfactor, max_step
        self.error_order = error_order
        self.pi_safety = safety ** (error_order * (self.alpha - self.beta))
        self.prev_ratio: float | None = None
        self.after_rejection = False

    def propose(self, h: float, ratio: float, accepted: bool) -> float:
        """Next step size (same sign as ``h``) after a step with error ratio ``ratio``."""
        if ratio == 0.0:
            factor = self.ifactor
        elif self.prev_ratio is None:
            # No error history yet: plain integral control, so short solves (a neural ODE often
            # takes 2-3 steps) are not slowed by the PI term's damping of the first growth.
            factor = self.safety * ratio ** (-1.0 / self.error_order)
        else:
            factor = self.pi_safety * ratio ** (-self.alpha)
            if accepted:
                factor *= self.prev_ratio ** self.beta
        grow_cap = self.ifactor if (accepted and not self.after_rejection) else 1.0
        factor = min(grow_cap, max(self.dfactor, factor))
        self.after_rejection = not accepted
        if accepted:
            self.prev_ratio = max(ratio, 1e-4)
        h_new = h * factor
        if abs(h_new) > self.max_step:
            h_new = math.copysign(self.max_step, h)
        return h_new


def initial_step(rhs: Callable[[float, torch.Tensor], torch.Tensor], t0: float, y0: torch.Tensor,
                 f0: torch.Tensor, order: int, rtol: float, atol: float | torch.Tensor, direction: float,
                 span: float = math.inf,
                 norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Hairer-Norsett-Wanner initial step heuristic (Solving ODEs I, II.4). Costs one evaluation.

    The probe and the result never exceed ``span`` (the length of the integration interval): a
    right-hand side may only be defined on it (an adjoint reading an interpolant of z(t)).
    ``norm``: the solve's error norm of a scaled state (default RMS), as torchdiffeq uses it here.
    Returns a Python float with the sign of ``direction``.
    """
    n = math.sqrt(y0.numel())
    if norm is None:
        norm = lambda v: torch.linalg.vector_norm(v) / n  # noqa: E731
    with torch.no_grad():
        scale = y0.abs().mul(rtol).add_(atol)
        d0 = abs(float(norm(y0 / scale)))
        d1 = abs(float(norm(f0 / scale)))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5 or not math.isfinite(d0 / d1)) else 0.01 * d0 / d1
        h0 = min(h0, span)
        y1 = torch.add(y0, f0, alpha=direction * h0)
        f1 = rhs(t0 + direction * h0, y1)
        d2 = abs(float(norm((f1 - f0) / scale))) / h0
        if max(d1, d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        h = min(100 * h0, h1, span)
    return direction * h
