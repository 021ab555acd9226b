"""Implicit Runge-Kutta steps: the stage equations solved by simplified Newton, differentiated by
the implicit function theorem.

A step of a tableau whose ``A`` has entries on or above the diagonal solves, for each *block* of
coupled stages ``I`` (one stage at a time for diagonally implicit tableaux, all stages together
for fully implicit ones),

    K_i = f(t + c_i h, y + h sum_j a_ij K_j),   i in I,

for the stage derivatives ``K_I``. Newton's matrix is ``I - h (A_II kron J)`` with ``J = df/dy``
taken once per step at ``(t, y)`` (simplified Newton, Hairer & Wanner, Solving ODEs II, IV.8). It
is formed densely from torch autograd (``N`` batched vector-Jacobian products) and LU-factorised
for small states, or applied matrix-free through Jacobian-vector products and solved by GMRES for
large ones (``options["jacobian"]``). Should simplified Newton fail (a Jacobian that changes
much within the step), full Newton with Jacobians at the current stage points takes over before
the step is declared failed. A right-hand side that carries no autograd graph (the
adjoint systems' vector-Jacobian products are such) gets its Jacobian from finite differences:
Newton's matrix only steers the iteration, it does not change the converged stages.

Gradients never differentiate the Newton iterations. The converged stages are re-attached to the
graph through one evaluation of ``f`` at the converged stage points whose gradient is replaced,
in a tensor hook, by the implicit-function-theorem adjoint ``(I - D)^{-T} g`` with
``D_ij = h a_ij df/dy(t_i, Y_i)`` - the exact derivative of the converged discrete map. The
values are bit-identical with and without autograd, so ``checkpointed`` recomputes exactly what
``backprop`` differentiated.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from ..errors import SolverError
from .combine import combine
from .config import ControlOptions, NewtonOptions, SolverConfig
from .tableau import ButcherTableau

__all__ = ["implicit_rk_step", "stage_blocks", "gmres", "DENSE_JACOBIAN_MAX"]

#: ``jacobian="auto"`` forms Newton's matrix densely up to this many state entries, else Krylov.
DENSE_JACOBIAN_MAX = 64
_JACOBIANS = ("auto", "dense", "krylov")


@functools.cache
def stage_blocks(tab: ButcherTableau) -> tuple:
    """The stages after the first, grouped into the smallest consecutive blocks that can be solved
    one after another: no stage of a block depends on a later block. A block of one stage whose
    diagonal entry is zero is explicit."""
    blocks, i = [], 1
    while i < tab.stages:
        end, j = i, i
        while j <= end:
            row = tab.a[j]
            last = max((k for k in range(j, len(row)) if row[k] != 0.0), default=j)
            end = max(end, last)
            j += 1
        blocks.append(tuple(range(i, end + 1)))
        i = end + 1
    return tuple(blocks)


def _coef(tab, i, j):
    row = tab.a[i]
    return row[j] if j < len(row) else 0.0


class _Settings:
    """Newton's options for one step (from the solver configuration)."""

    def __init__(self, config: SolverConfig | None, y, atol=None):
        control, newton = (ControlOptions(), NewtonOptions()) if config is None else (config.control, config.newton)
        self.rtol = float(control.rtol)
        self.atol = atol if atol is not None else float(control.atol)
        self.max_iters = int(newton.max_iters)
        eps = torch.finfo(y.dtype).eps
        tol = newton.tol
        if tol is None:
            # Hairer's RADAU5 default: sqrt(rtol), but never below what round-off can resolve.
            tol = max(10.0 * eps / self.rtol, min(0.03, math.sqrt(self.rtol))) if self.rtol > 0 else 0.03
        self.tol = float(tol)
        self.eps = eps
        mode = newton.jacobian
        if mode not in _JACOBIANS:
            raise ValueError(f"options['jacobian'] must be one of {_JACOBIANS}, got {mode!r}")
        if mode == "auto":
            mode = "dense" if y.numel() <= DENSE_JACOBIAN_MAX else "krylov"
        self.jacobian = mode


def implicit_rk_step(rhs, tab: ButcherTableau, t: float, y, f0, h: float, *, quad: bool = False,
                     config=None, context: str | None = None, atol=None):
    """One step of an implicit Runge-Kutta tableau from ``(t, y)``; same contract as
    :func:`~pyode_bridge.solvers.rk_step`.

    ``f0 = rhs(t, y)`` is stage 0 (every tableau's first stage is explicit). Returns
    ``(y_new (N,), ks (list of S tensors (N,)), dqs (list of S tensors) or None, None)``. With
    ``quad`` the ``dq`` parts of the implicit stages come from the last Newton evaluation (within
    the Newton tolerance of the converged stage points; they do not enter the stage equations).
    ``atol`` (a float or a tensor ``(N,)``) replaces ``config.control.atol`` in Newton's error scale.

    Raises:
        SolverError: Newton's method diverged or did not converge in ``max_newton_iters``.
    """
    opts = _Settings(config, y, atol)
    rhs_y = (lambda tt, yy: rhs(tt, yy)[0]) if quad else rhs
    ks: list = [None] * tab.stages
    dqs: list = [None] * tab.stages  # filled only with a quadrature
    ks[0], dqs[0] = f0 if quad else (f0, None)
    frozen = _FrozenNewton(_Jacobian(rhs_y, t, y, opts), h, opts)
    for block in stage_blocks(tab):
        bases = [combine(y, [(h * _coef(tab, i, j), ks[j]) for j in range(block[0])]) for i in block]
        times = [t + tab.c[i] * h for i in block]
        if len(block) == 1 and _coef(tab, block[0], block[0]) == 0.0:
            out = rhs(times[0], bases[0])
            ks[block[0]], dqs[block[0]] = out if quad else (out, None)
            continue
        A = [[_coef(tab, i, j) for j in block] for i in block]
        K, DQ = _solve_block(rhs, rhs_y, quad, bases, times, A, h, y, ks[0], frozen, opts,
                             (tab, t, context))
        for n, i in enumerate(block):
            ks[i], dqs[i] = K[n], (DQ[n] if quad else None)
    y_new = combine(y, [(h * b, k) for b, k in zip(tab.b, ks)])
    return y_new, ks, (dqs if quad else None), None


class _NewtonFailure(Exception):
    """Newton's iteration did not converge (``args[0]`` says how)."""


def _solve_block(rhs, rhs_y, quad, bases, times, A, h, y, f0, frozen, opts, where):
    """Solve one block of stage equations. Returns ``(K (m, N), DQ (m, Q) or None)``, ``K`` on the
    autograd graph through the implicit-function-theorem hook when grad mode is on.

    Simplified Newton first (one Jacobian per step); if it fails, full Newton from the same start
    (Jacobians at the current stage points, every iteration), which also handles a Jacobian that
    changes much within the step.
    """
    A_t = torch.tensor(A, dtype=y.dtype, device=y.device)
    with torch.no_grad():
        B = torch.stack([b.detach() for b in bases])
        scale = y.detach().abs().mul(opts.rtol) + opts.atol  # atol: a float or a tensor (N,)
        K0 = f0.detach().expand(len(times), -1).clone()
        try:
            K, DQ = _newton(rhs, quad, B, times, A_t, h, K0, scale, opts,
                            lambda Y: frozen.solver(A, A_t), full=False)
        except _NewtonFailure as first:
            try:
                K, DQ = _newton(rhs, quad, B, times, A_t, h, K0, scale, opts,
                                lambda Y: _full_solver(rhs_y, times, Y, A_t, h, opts), full=True)
            except _NewtonFailure as second:
                tab, t, context = where
                raise _fail(context, tab, t, h, f"{first.args[0]} with one Jacobian per step and "
                            f"{second.args[0]} with a Jacobian per iteration", opts) from None
    if not torch.is_grad_enabled():
        return K, DQ
    with torch.no_grad():
        Y_star = B + h * (A_t @ K)
    m = len(times)
    points = [combine(bases[n], [(h * A[n][j], K[j]) for j in range(m)]) for n in range(m)]
    P = torch.stack([rhs_y(tt, p) for tt, p in zip(times, points)])
    if not P.requires_grad:
        return K, DQ
    P.register_hook(_IFTHook(rhs_y, times, Y_star, A_t, h, opts))
    # Value K exactly (P - P.detach() is 0); gradient through f's graph at the converged points.
    return K + (P - P.detach()), DQ


def _newton(rhs, quad, B, times, A, h, K, scale, opts, solver_at, full):
    """Newton's iteration for ``K_i = f(t_i, B_i + h sum_j a_ij K_j)`` from ``K`` (``(m, N)``).

    ``solver_at(Y)`` gives the linear solve ``r -> (I - h [a_ij J_i])^{-1} r`` for the iterate's
    stage points ``Y``. Stops when the estimated distance to the solution, ``theta / (1 - theta)``
    times the last update (Hairer & Wanner IV.8), is below ``opts.tol`` in the RMS norm scaled by
    ``atol + rtol |y|``, or the update is below round-off. Raises :class:`_NewtonFailure`.
    """
    delta_prev, eta, DQ, delta = None, 1.0, None, math.inf
    for it in range(opts.max_iters):
        Y = B + h * (A @ K)
        outs = [rhs(tt, Y[n]) for n, tt in enumerate(times)]
        F = torch.stack([o[0] for o in outs] if quad else outs)
        if quad:
            DQ = torch.stack([o[1] for o in outs])
        dK = solver_at(Y)(F - K)
        K = K + dK
        # One host sync per iteration: the update's size and what round-off can resolve.
        delta, size = (torch.stack([torch.linalg.vector_norm(h * dK / scale),
                                    torch.linalg.vector_norm(Y / scale)]) / math.sqrt(Y.numel())).tolist()
        if not math.isfinite(delta):
            raise _NewtonFailure(f"met NaN/Inf (iteration {it + 1}: the right-hand side or the "
                                 "iterate blew up)")
        if delta <= 10.0 * opts.eps * size:
            return K, DQ
        if delta_prev is not None:
            theta = delta / delta_prev
            # Full Newton may grow at first from a poor start; simplified Newton that grows is
            # handed over to full Newton at once.
            if theta >= (2.0 if full else 1.0):
                raise _NewtonFailure(f"diverged (iteration {it + 1}: the update grew by a factor "
                                     f"{theta:.3g})")
            eta = theta / (1.0 - theta) if theta < 1.0 else math.inf
        if eta * delta <= opts.tol:
            return K, DQ
        delta_prev = delta
    raise _NewtonFailure(f"did not converge in {opts.max_iters} iterations (last update "
                         f"{delta:.3g} x the tolerance scale)")


def _fail(context, tab, t, h, why, opts):
    where = f"{context} with method '{tab.name}'" if context else f"method '{tab.name}'"
    return SolverError(
        f"{where}: Newton's method for the implicit stages {why}, in the step from t={t:.6g} to "
        f"t={t + h:.6g} (h={h:.3g}). Use a smaller step size (options={{'step_size': ...}} or a "
        f"finer grid), or raise options['max_newton_iters'] (now {opts.max_iters}) or "
        f"options['newton_tol'] (now {opts.tol:.3g}, relative to atol + rtol*|y|); if the "
        "right-hand side blows up here, check func.")


class _IFTHook:
    """Replaces the gradient ``g`` reaching the stage derivatives by ``(I - D)^{-T} g``,
    ``D_ij = h a_ij df/dy(t_i, Y_i)`` at the converged stage points ``Y``: back-propagated through
    ``f(t_i, Y_i)`` it gives the exact derivative of the converged stages (implicit function
    theorem) with respect to the state, the earlier stages and the parameters."""

    def __init__(self, rhs_y, times, Y, A, h, opts):
        self.rhs_y, self.times, self.Y, self.A, self.h, self.opts = rhs_y, times, Y, A, h, opts

    def __call__(self, g):
        if g is None:  # an undefined gradient (no output depends on these stages)
            return None
        if torch.is_grad_enabled():
            raise RuntimeError("higher-order gradients (create_graph=True) through an implicit "
                               "method's Newton solve are not supported; use an explicit method "
                               "for double backward.")
        m, N = self.Y.shape
        with torch.enable_grad():
            Ys = [self.Y[n].detach().requires_grad_(True) for n in range(m)]
            Fs = [self.rhs_y(tt, Yn) for tt, Yn in zip(self.times, Ys)]
        if not any(F.requires_grad for F in Fs):
            return g  # f does not depend on the state through autograd: D = 0
        if self.opts.jacobian == "dense":
            Js = torch.stack([_autograd_jacobian(F, Yn) for F, Yn in zip(Fs, Ys)])  # (m, N, N)
            M = _block_matrix(self.A, Js, self.h)
            return torch.linalg.solve(M.mT, g.reshape(-1, 1)).reshape(m, N)

        def rmatvec(v):
            lam = v.reshape(m, N)
            mu = torch.autograd.grad(Fs, Ys, list(lam), retain_graph=True, allow_unused=True)
            mu = torch.stack([x if x is not None else torch.zeros_like(lam[0]) for x in mu])
            return (lam - self.h * (self.A.mT @ mu)).reshape(-1)

        tol = 1e-12 if g.dtype == torch.float64 else 1e-6
        lam, ok, res = gmres(rmatvec, g.reshape(-1), rtol=tol, max_iter=max(50, 2 * m * N))
        if not ok:
            warnings.warn(f"the implicit-function-theorem solve in the backward of an implicit "
                          f"Runge-Kutta step reached only a relative residual of {res:.2g}; the "
                          "gradient is approximate. Use options={'jacobian': 'dense'} or a "
                          "smaller step.", RuntimeWarning, stacklevel=2)
        return lam.reshape(m, N)


def _autograd_jacobian(f, x):
    """``df/dx`` as an ``(N, N)`` matrix for 1-D ``f`` and ``x`` of size ``N`` (``N`` batched
    vector-Jacobian products; one backward per row where an operation has no vmap rule)."""
    N = x.numel()
    if not f.requires_grad:
        return torch.zeros(N, N, dtype=x.dtype, device=x.device)
    eye = torch.eye(N, dtype=f.dtype, device=f.device)
    try:
        J = torch.autograd.grad(f, x, eye, retain_graph=True, is_grads_batched=True,
                                allow_unused=True)[0]
    except RuntimeError:
        rows = [torch.autograd.grad(f, x, e, retain_graph=True, allow_unused=True)[0] for e in eye]
        J = None if rows[0] is None else torch.stack(rows)
    return torch.zeros(N, N, dtype=x.dtype, device=x.device) if J is None else J.detach()


def _block_matrix(A, Js, h):
    """``I - h [a_ij J_i]_ij`` as an ``(mN, mN)`` matrix (``Js``: ``(m, N, N)``)."""
    m, N = Js.shape[0], Js.shape[1]
    blocks = A[:, None, :, None] * Js[:, :, None, :]  # [i, r, j, s] = a_ij J_i[r, s]
    M = torch.eye(m * N, dtype=Js.dtype, device=Js.device)
    return M - h * blocks.reshape(m * N, m * N)


class _Jacobian:
    """``J = df/dy`` at one point ``(t, y)``, formed on first use: a dense ``(N, N)`` matrix, or
    a Jacobian-vector product. From autograd; from finite differences where ``f`` carries no graph
    to the state (an adjoint system's vector-Jacobian products): Newton's matrix only steers the
    iteration, so an approximate one costs iterations, never accuracy."""

    def __init__(self, rhs_y, t, y, opts):
        self.rhs_y, self.t, self.y, self.opts = rhs_y, t, y.detach(), opts
        self._dense = self._jvp = None

    def dense(self):
        if self._dense is None:
            with torch.enable_grad():
                yd = self.y.clone().requires_grad_(True)
                f = self.rhs_y(self.t, yd)
            if f.requires_grad:
                self._dense = _autograd_jacobian(f, yd)
            else:
                # Hairer's increments sqrt(eps * max(1e-5, |y_j|)).
                f, N = f.detach(), self.y.numel()
                J = torch.empty(N, N, dtype=f.dtype, device=f.device)
                incr = torch.sqrt(self.opts.eps * self.y.abs().clamp_min(1e-5))
                for j in range(N):
                    yj = self.y.clone()
                    yj[j] += incr[j]
                    J[:, j] = (self.rhs_y(self.t, yj) - f) / incr[j]
                self._dense = J
        return self._dense

    def jvp(self, v):
        if self._jvp is None:
            self._jvp = self._make_jvp()
        return self._jvp(v)

    def _make_jvp(self):
        with torch.enable_grad():
            yd = self.y.clone().requires_grad_(True)
            f = self.rhs_y(self.t, yd)
            if f.requires_grad:
                # J v by two reverse passes: g(u) = J^T u is linear in u, so (dg/du)^T v = J v.
                u = torch.zeros_like(f, requires_grad=True)
                g = torch.autograd.grad(f, yd, u, create_graph=True, allow_unused=True)[0]
                if g is None:
                    return torch.zeros_like
                if g.requires_grad:
                    return lambda v: torch.autograd.grad(g, u, v, retain_graph=True)[0].detach()
        f = f.detach()
        norm_y = float(torch.linalg.vector_norm(self.y))

        def jvp_fd(v):
            nv = float(torch.linalg.vector_norm(v))
            if nv == 0.0:
                return torch.zeros_like(v)
            sigma = math.sqrt(self.opts.eps) * (1.0 + norm_y) / nv
            return (self.rhs_y(self.t, self.y + sigma * v) - f) / sigma
        return jvp_fd


def _linear_solver(jacs, A, h, opts):
    """``r (m, N) -> (I - h [a_ij J_i])^{-1} r`` for the Jacobians ``jacs`` (one per stage of the
    block; the same object repeated in simplified Newton): LU of the dense matrix, or GMRES on
    Jacobian-vector products."""
    m, N = A.shape[0], jacs[0].y.numel()
    if opts.jacobian == "dense":
        Js = torch.stack([J.dense() for J in jacs])
        LU, piv, info = torch.linalg.lu_factor_ex(_block_matrix(A, Js, h))
        if int(info) != 0:
            raise _NewtonFailure("met a singular Newton matrix I - h A J")
        return lambda r: torch.linalg.lu_solve(LU, piv, r.reshape(-1, 1)).reshape(m, N)
    tol = 1e-10 if jacs[0].y.dtype == torch.float64 else 1e-5

    def matvec(v):
        W = A @ v.reshape(m, N)
        return (v.reshape(m, N) - h * torch.stack([J.jvp(w) for J, w in zip(jacs, W)])).reshape(-1)

    def solve(r):
        # An inexact linear solve only slows Newton down; Newton's own test decides.
        x, _, _ = gmres(matvec, r.reshape(-1), rtol=tol, max_iter=max(20, min(m * N, 100)))
        return x.reshape(m, N)
    return solve


class _FrozenNewton:
    """Simplified Newton's linear solves for one step: ``J = df/dy(t, y)`` for every stage, each
    distinct ``A_II`` factorised once (the diagonal blocks of an SDIRK method are all alike)."""

    def __init__(self, jac, h, opts):
        self.jac, self.h, self.opts, self.solvers = jac, h, opts, {}

    def solver(self, A, A_t):
        """The solve for the block ``A`` (nested lists; ``A_t``: the same as a tensor)."""
        key = tuple(map(tuple, A))
        if key not in self.solvers:
            self.solvers[key] = _linear_solver([self.jac] * len(A), A_t, self.h, self.opts)
        return self.solvers[key]


def _full_solver(rhs_y, times, Y, A, h, opts):
    """Full Newton's linear solve at the iterate's stage points ``Y`` (``(m, N)``)."""
    return _linear_solver([_Jacobian(rhs_y, tt, Y[n], opts) for n, tt in enumerate(times)], A, h, opts)


def gmres(matvec, b: torch.Tensor, *, rtol: float, max_iter: int, restart: int = 50):
    """Solve ``matvec(x) = b`` (flat tensors) by restarted GMRES from ``x = 0``.

    Returns ``(x, converged, relative_residual)``. Arnoldi with modified Gram-Schmidt; the small
    least-squares problem is solved in float64 on the host at every iteration (the residual norm
    decides when to stop).
    """
    bnorm = float(torch.linalg.vector_norm(b))
    x = torch.zeros_like(b)
    if bnorm == 0.0 or not math.isfinite(bnorm):
        return x, bnorm == 0.0, 0.0 if bnorm == 0.0 else math.inf
    r = b
    done, rel = 0, 1.0
    while done < max_iter:
        beta = float(torch.linalg.vector_norm(r))
        rel = beta / bnorm
        if rel <= rtol:
            return x, True, rel
        m = min(restart, max_iter - done, b.numel())
        V = [r / beta]
        H = torch.zeros(m + 1, m, dtype=torch.float64)
        e1 = torch.zeros(m + 1, dtype=torch.float64)
        e1[0] = beta
        y_small, k = None, 0
        for j in range(m):
            w = matvec(V[j])
            for i in range(j + 1):
                H[i, j] = float(torch.dot(w, V[i]))
                w = w - H[i, j].item() * V[i]
            H[j + 1, j] = float(torch.linalg.vector_norm(w))
            k = j + 1
            done += 1
            y_small = torch.linalg.lstsq(H[:k + 1, :k], e1[:k + 1].unsqueeze(1)).solution[:, 0]
            res = float(torch.linalg.vector_norm(H[:k + 1, :k] @ y_small - e1[:k + 1]))
            if res <= rtol * bnorm or H[j + 1, j] <= 1e-14 * beta:
                break
            V.append(w / H[j + 1, j].item())
        x = combine(x, [(float(y_small[i]), V[i]) for i in range(k)]) if y_small is not None else x
        r = b - matvec(x)
    rel = float(torch.linalg.vector_norm(r)) / bnorm
    return x, rel <= rtol, rel
