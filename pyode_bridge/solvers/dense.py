"""Dense output: the continuous extension of accepted steps.

Every sensitivity method reads the forward trajectory z(t) through this one interface:
:class:`DenseStep` (one accepted step) and :class:`DenseSolution` (a sequence of them).
"""
from __future__ import annotations

import abc
import bisect
import functools
import math

import torch

from .combine import combine
from .tableau import ButcherTableau

__all__ = ["DenseStep", "RKDenseStep", "HermiteDenseStep", "PolynomialDenseStep", "DenseSolution"]


class DenseStep(abc.ABC):
    """Continuous extension of one accepted step from ``t0`` to ``t1 = t0 + h``.

    Subclasses implement :meth:`evaluate_inside` and :meth:`compact`. ``y0``/``y1`` are the flat states (shape
    ``(N,)``) at the step's ends, which :meth:`evaluate` and :meth:`evaluate_many` give exactly there.
    """

    t0: float
    h: float
    y0: torch.Tensor
    y1: torch.Tensor
    # The step's first stage, set by solvers.loop.dense_step: f(t0, y0), or the derivative carried
    # from the step before (ButcherTableau.carry_last), which a replay of the step needs.
    k0: torch.Tensor | None = None

    @property
    def t1(self) -> float:
        return self.t0 + self.h

    def evaluate(self, t: float) -> torch.Tensor:
        """State at time ``t`` (a Python float inside the step or at its ends), shape ``(N,)``."""
        if t == self.t1:
            return self.y1
        if t == self.t0:
            return self.y0
        return self.evaluate_inside(t)

    @abc.abstractmethod
    def evaluate_inside(self, t: float) -> torch.Tensor:
        """The continuous extension at ``t``, strictly between the step's ends, shape ``(N,)``."""

    def evaluate_many(self, ts) -> torch.Tensor:
        """States at several times inside the step (Python floats), shape ``(K, N)``.

        One matrix product for all ``K`` times (the continuous extension is linear in a few stored
        vectors), so many output times or interpolation nodes in a step cost about one."""
        basis_coef = self._basis(ts) if len(ts) > 1 else None
        if basis_coef is None:  # one time, or an extension without a linear basis
            return torch.stack([self.evaluate(t) for t in ts])
        basis, coef = basis_coef
        if not isinstance(coef, torch.Tensor):
            coef = torch.tensor(coef, dtype=torch.float64)
        out = torch.mm(coef.to(basis.dtype).to(basis.device, non_blocking=True), basis)
        # Exact endpoints, as evaluate() gives them.
        t0, t1 = self.t0, self.t1
        for k, t in enumerate(ts):
            if t == t1:
                out[k] = self.y1
            elif t == t0:
                out[k] = self.y0
        return out

    def _basis(self, ts):
        """``(B (M, N), C)`` with ``y(ts[k]) = sum_m C[k][m] B[m]`` (``C``: K x M nested lists, or a
        float64 CPU tensor), or None where the extension has no such form (then
        ``evaluate_many`` evaluates one by one)."""
        return None

    @abc.abstractmethod
    def compact(self) -> PolynomialDenseStep:
        """The same interpolant as a polynomial in theta, to store it cheaply (used by adjoints)."""

    def interpolation_check(self) -> torch.Tensor | None:
        """Per component, shape ``(N,)``: the distance between this interpolant and an
        independent estimate built from the same step (evaluating at most ``f(t1, y1)``, which the
        next step reuses), a measure of the interpolant's own error (not of the step's); None
        where the step has no such estimate."""
        return None

    def _theta(self, t: float) -> float:
        return (t - self.t0) / self.h


class RKDenseStep(DenseStep):
    """A Runge-Kutta method's own continuous extension: ``y0 + h * sum_i b_i(theta) k_i``.

    A tableau with ``dense_stages`` needs ``rhs(t, y) -> dy`` to evaluate them, on first use.
    """

    def __init__(self, tableau: ButcherTableau, t0: float, h: float, y0, y1, ks, rhs=None):
        self.tableau, self.t0, self.h, self.y0, self.y1, self.ks = tableau, t0, h, y0, y1, ks
        self.rhs = rhs
        self._all_ks = None if tableau.dense_stages else ks

    @property
    def dense_ready(self) -> bool:
        """Whether evaluating the extension costs no more evaluations of ``rhs``."""
        return self._all_ks is not None

    def stage_values(self) -> list:
        """The stages and the dense stages (evaluated here on the first call)."""
        if self._all_ks is None:
            if self.rhs is None:
                raise ValueError(f"the dense output of '{self.tableau.name}' needs rhs to evaluate its "
                                 "dense stages")
            ks = list(self.ks)
            for c, row in self.tableau.dense_stages:
                yi = combine(self.y0, [(self.h * a, k) for a, k in zip(row, ks)])
                ks.append(self.rhs(self.t0 + c * self.h, yi))
            self._all_ks = ks
        return self._all_ks

    def evaluate_inside(self, t):
        w = self.tableau.dense_weights(self._theta(t))
        return combine(self.y0, [(self.h * wi, k) for wi, k in zip(w, self.stage_values())])

    def _basis(self, ts):
        basis = torch.stack([self.y0, *self.stage_values()])
        # The K x S weights b_i(theta_k) as one product of theta's powers with the tableau's dense
        # coefficients (float64 on the CPU), not K Python evaluations of dense_weights.
        theta = (torch.tensor(ts, dtype=torch.float64) - self.t0) / self.h
        dense = _dense_matrix(self.tableau)  # (P, S)
        powers = theta.unsqueeze(1) ** torch.arange(1, dense.shape[0] + 1, dtype=torch.float64)
        coef = torch.cat([torch.ones(len(ts), 1, dtype=torch.float64), (powers @ dense).mul_(self.h)], 1)
        return basis, coef

    def compact(self):
        rows = zip(*self.tableau.dense)  # per power p: coefficients over stages
        ks = self.stage_values()
        q = [combine(None, [(self.h * c, k) for c, k in zip(row, ks)]) for row in rows]
        q = [qi if qi is not None else torch.zeros_like(self.y0) for qi in q]
        return PolynomialDenseStep(self.t0, self.h, self.y0, self.y1, q)

    def interpolation_check(self):
        """By the kind of extension:

        * a collocation polynomial of degree ``s >= 2`` (Radau IIA, Gauss-Legendre): against the
          polynomial of degree ``s - 1`` through its values at the nodes ``c_j`` (the stages);
          the two differ by ``alpha prod_j (theta - c_j)``, fixed by their difference at
          ``theta = 0``, ``y0 - p(0)``. Both hold the stages, which Newton made consistent with
          ``f``, so a stiff component on its slow manifold is not flagged; a step whose ``y0`` is
          off the manifold the stages sit on (a transient stepped over) is. Cubic Hermite, which
          extrapolates ``f(t1, y1)``, is off by ``h |df/dy|`` times the state's error on every
          stiff step (measured: 100x the gradient's error on a resolved stiff problem).
        * an adaptive explicit pair's extension (dopri5, tsit5, dopri8): the step's embedded
          error estimate, the distance between its two solutions at ``t1``; these extensions are
          built to the step's accuracy (measured on ``y' = y cos t``: 0.1-4x their largest error
          inside the step; cubic Hermite, of order 4, over-estimates dopri8's by up to 10^7).

        trapezoid's (Lobatto IIIA) quadratic is its own cubic Hermite: None. (Implicit Euler and
        midpoint interpolate by cubic Hermite, whose own check applies.)"""
        tab = self.tableau
        if tab.implicit:
            nodes = _collocation_nodes(tab)
            if len(nodes) >= 2:
                values = self.evaluate_many([self.t0 + c * self.h for c in nodes])
                weights, peak = _extrapolation(nodes)
                p0 = combine(None, list(zip(weights, values.unbind(0))))
                return (self.y0 - p0).abs().mul_(peak)
            return None
        if tab.b_err is not None:
            return combine(None, [(self.h * b, k) for b, k in zip(tab.b_err, self.ks)]).abs()
        return None


@functools.cache
def _collocation_nodes(tab: ButcherTableau) -> tuple:
    """The distinct ``c_j > 0`` of the stages that enter ``tab``'s dense output."""
    assert tab.dense is not None  # only tableaux with a continuous extension get here
    return tuple(sorted({c for c, row in zip(tab.c, tab.dense) if c > 0 and any(row)}))


@functools.cache
def _extrapolation(nodes: tuple) -> tuple:
    """``(w, M)``: ``p(0) = sum_j w_j p(c_j)`` for a polynomial of degree ``< len(nodes)``, and
    ``M = max over theta in [0, 1] of |prod_j (theta - c_j)| / prod_j c_j``."""
    w = [math.prod(-cm / (cj - cm) for cm in nodes if cm != cj) for cj in nodes]
    peak = max(abs(math.prod(k / 1000 - c for c in nodes)) for k in range(1001)) / math.prod(nodes)
    return w, peak


_DENSE: dict = {}


def _dense_matrix(tab: ButcherTableau) -> torch.Tensor:
    """``tab.dense`` transposed, ``(P, S)`` float64 on the CPU (cached; keyed by identity, the entry
    keeps ``tab`` alive)."""
    entry = _DENSE.get(id(tab))
    if entry is None or entry[0] is not tab:
        if len(_DENSE) >= 64:  # tableaux made on the fly must not accumulate here
            _DENSE.clear()
        entry = _DENSE[id(tab)] = (tab, torch.tensor(tab.dense, dtype=torch.float64).T.contiguous())
    return entry[1]


class HermiteDenseStep(DenseStep):
    """Cubic Hermite interpolation from the states and derivatives at both ends (3rd order)."""

    def __init__(self, t0: float, h: float, y0, y1, f0, f1):
        # f1 may be a zero-argument callable: the end derivative is then evaluated on first use.
        self.t0, self.h, self.y0, self.y1, self.f0, self._f1 = t0, h, y0, y1, f0, f1

    @property
    def f1(self):
        if callable(self._f1) and not isinstance(self._f1, torch.Tensor):
            self._f1 = self._f1()
        return self._f1

    def evaluate_inside(self, t):
        s = self._theta(t)
        h01 = s * s * (3.0 - 2.0 * s)
        h10 = s * (1.0 - s) * (1.0 - s)
        h11 = s * s * (s - 1.0)
        return combine(self.y0, [(-h01, self.y0), (h01, self.y1),
                                 (self.h * h10, self.f0), (self.h * h11, self.f1)])

    def _basis(self, ts):
        basis = torch.stack([self.y0, self.y1, self.f0, self.f1])
        coef = []
        for t in ts:
            s = self._theta(t)
            h01 = s * s * (3.0 - 2.0 * s)
            coef.append([1.0 - h01, h01, self.h * s * (1.0 - s) * (1.0 - s), self.h * s * s * (s - 1.0)])
        return basis, coef

    def compact(self):
        d = self.y1 - self.y0
        hf0, hf1 = self.h * self.f0, self.h * self.f1
        q = [hf0, 3.0 * d - 2.0 * hf0 - hf1, -2.0 * d + hf0 + hf1]
        return PolynomialDenseStep(self.t0, self.h, self.y0, self.y1, q)

    def interpolation_check(self):
        """Against the embedded quadratics through both ends and one end derivative: the cubic
        minus either is ``theta^2 (1 - theta) E`` or ``theta (1 - theta)^2 E``, ``E = 2 (y1 - y0) -
        h (f0 + f1)``, at most ``4/27 |E|``. One order lower than the cubic, so it over-estimates
        the cubic's error on a resolved step (by about ``h |y^(3)| / |y^(4)|``); no evaluation."""
        return (2.0 * (self.y1 - self.y0) - self.h * (self.f0 + self.f1)).abs().mul_(4.0 / 27.0)


class PolynomialDenseStep(DenseStep):
    """``y(t0 + theta h) = y0 + sum_p theta**(p+1) q[p]``: the storage form of any dense step."""

    def __init__(self, t0: float, h: float, y0, y1, q):
        self.t0, self.h, self.y0, self.y1, self.q = t0, h, y0, y1, q

    def evaluate_inside(self, t):
        s = self._theta(t)
        return combine(self.y0, [(s ** (p + 1), qp) for p, qp in enumerate(self.q)])

    def _basis(self, ts):
        basis = torch.stack([self.y0, *self.q])
        coef = [[1.0] + [self._theta(t) ** (p + 1) for p in range(len(self.q))] for t in ts]
        return basis, coef

    def compact(self):
        return self


class DenseSolution:
    """The continuous trajectory of a solve: consecutive dense steps covering ``[t_start, t_end]``.

    ``evaluate(t)`` finds the step that holds ``t`` (by bisection on the step start times) and
    evaluates its interpolant. Works for increasing and decreasing time.
    """

    def __init__(self, steps=()):
        self.steps = []
        self._keys = []
        self._sign = 1.0
        for s in steps:
            self.append(s)

    def append(self, step: DenseStep) -> None:
        if not self.steps:
            self._sign = 1.0 if step.h > 0 else -1.0
        self.steps.append(step)
        self._keys.append(self._sign * step.t0)

    @property
    def t_start(self) -> float:
        return self.steps[0].t0

    @property
    def t_end(self) -> float:
        return self.steps[-1].t1

    def _index(self, t: float) -> int:
        """The step that holds ``t`` (the first or the last one for a time beyond them)."""
        if not self.steps:
            raise ValueError("DenseSolution is empty")
        return min(max(bisect.bisect_right(self._keys, self._sign * t) - 1, 0), len(self.steps) - 1)

    def evaluate(self, t: float) -> torch.Tensor:
        """State at ``t`` (Python float within the solved range), shape ``(N,)``."""
        return self.steps[self._index(t)].evaluate(t)

    __call__ = evaluate

    def evaluate_many(self, ts) -> torch.Tensor:
        """States at several times (Python floats within the solved range), ``(K, N)``: one batched
        evaluation per step that holds some of them."""
        if not self.steps:
            raise ValueError("DenseSolution is empty")
        groups: dict[int, list[int]] = {}  # step index -> positions in ts
        for k, t in enumerate(ts):
            groups.setdefault(self._index(t), []).append(k)
        if len(groups) == 1:
            (i, _), = groups.items()
            return self.steps[i].evaluate_many(list(ts))
        parts, order = [], []
        for i, ks in groups.items():
            parts.append(self.steps[i].evaluate_many([ts[k] for k in ks]))
            order.extend(ks)
        out = torch.cat(parts)
        if order != sorted(order):
            out = out[torch.tensor(order).argsort().to(out.device)]
        return out

    def __len__(self) -> int:
        return len(self.steps)
