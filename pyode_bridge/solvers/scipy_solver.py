"""``scipy_solver``: the solvers of ``scipy.integrate.solve_ivp`` behind :func:`integrate`'s contract
(torchdiffeq's ``method="scipy_solver"``, ``options={"solver": "RK45" | "RK23" | "DOP853" | "Radau"
| "BDF" | "LSODA"}``, default ``"LSODA"``).

scipy steps in float64 on the host; ``rhs`` sees the state's dtype and device. Each accepted step
is read through scipy's own continuous extension (outputs at ``t_eval``, ``on_step``), so the
adjoint methods run their backward solves with scipy too (torchdiffeq's ``odeint_adjoint(...,
method="scipy_solver")``); the adjoint's parameter integral rides along in the scipy state,
error-controlled like the state (or, with the seminorm, excluded by a huge ``atol``).

Forward only: nothing differentiates through scipy. A solve whose inputs require grad still
returns its values, but a backward through them raises an error that names the adjoint methods.
scipy is imported when the method is chosen, with a clear error if it is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .dense import DenseStep
from .loop import IntegrateResult
from .method import SolverMethod
from .util import RefuseBackward, collect_outputs, fail

__all__ = ["ScipyMethod", "SCIPY_SOLVERS", "ScipyDenseStep", "integrate_scipy", "import_scipy_integrate"]

SCIPY_SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
_JAC_SPARSITY = ("Radau", "BDF")  # implicit solvers that accept jac_sparsity
# atol of the quadrature components: so large that they never limit the step (inf would do, but
# scipy's finite-difference Jacobian scales its increments by atol and would compute inf * 0).
_NO_ERROR_CONTROL = 1e150


def import_scipy_integrate():
    """``scipy.integrate``, or an ImportError that says how to get it."""
    try:
        import scipy.integrate
    except ImportError as e:
        raise ImportError("method='scipy_solver' needs scipy, which is not installed: "
                          "`pip install scipy`, or choose a built-in method such as 'dopri5' or "
                          "'tsit5'.") from e
    return scipy.integrate


@dataclass(frozen=True)
class ScipyMethod(SolverMethod):
    """torchdiffeq's ``scipy_solver``.

    Attributes:
        solver: the ``solve_ivp`` method (``options['solver']``, default ``"LSODA"`` as torchdiffeq).
        min_step: smallest step (``options['min_step']``; only LSODA has one).
    """

    name: str = "scipy_solver"
    solver: str = "LSODA"
    min_step: float = 0.0

    order = 5  # nominal (RK45's); scipy's solvers range from 3 (RK23) to 8 (DOP853)
    adaptive = True
    OPTIONS = ("solver", "min_step")
    # scipy's OdeSolver.step() picks its step and retries it itself: it cannot attempt a step
    # between two given times, so it keeps its own loop rather than a stepper.
    own_loop = True

    def with_options(self, options: dict) -> "ScipyMethod":
        solver = options.pop("solver", self.solver)
        if solver not in SCIPY_SOLVERS:
            raise ValueError(f"unknown scipy solver options['solver']={solver!r} for method "
                             f"'scipy_solver'; use one of {list(SCIPY_SOLVERS)}")
        min_step = options.pop("min_step", self.min_step)
        try:
            min_step = float(min_step)
        except (TypeError, ValueError):
            min_step = float("nan")
        if not (np.isfinite(min_step) and min_step >= 0):
            raise ValueError(f"options['min_step'] must be a non-negative number, got {min_step!r}")
        if min_step > 0 and solver != "LSODA":
            raise ValueError(f"options['min_step'] is only used by scipy's 'LSODA', not {solver!r}; "
                             "drop it or use options={'solver': 'LSODA', ...}")
        import_scipy_integrate()
        return replace(self, solver=solver, min_step=min_step)

    def integrate(self, rhs, y0, t_eval, config, *, q0=None, q_splits=None, atol_scale=1.0,
                  q_atol_scale=1.0, on_step=None, context="forward solve", check_finite_every_step=None):
        return integrate_scipy(self, rhs, y0, t_eval, config, q0=q0, atol_scale=atol_scale,
                               q_atol_scale=q_atol_scale, on_step=on_step, context=context)


class ScipyDenseStep(DenseStep):
    """One accepted scipy step, read through the solver's own continuous extension
    (``OdeSolver.dense_output()``, float64 on the host); ``y0``/``y1`` are the step's end states."""

    def __init__(self, t0: float, t1: float, y0, y1, dense, n: int):
        self.t0, self.h, self._t1, self.y0, self.y1 = t0, t1 - t0, t1, y0, y1
        self.dense, self.n = dense, n

    @property
    def t1(self) -> float:
        return self._t1

    def evaluate_inside(self, t):
        return torch.tensor(self.dense(t)[:self.n], dtype=self.y0.dtype, device=self.y0.device)

    def compact(self):
        # Already compact: a few host arrays (scipy's interpolation coefficients), no graph.
        return self


def _no_backprop_message(method: ScipyMethod) -> str:
    return (f"method 'scipy_solver' (scipy's {method.solver}) is forward only: autograd cannot "
            "differentiate through scipy, so sensitivity='backprop' or 'checkpointed' has no "
            "gradient to give. Use an adjoint method, whose backward solve also runs scipy: "
            "odeint_adjoint(...) or sensitivity='backsolve', 'interpolated' or 'interpolating'; or "
            "a built-in method such as 'dopri5' with backprop.")


def integrate_scipy(method: ScipyMethod, rhs, y0, t_eval, config, *, q0=None, atol_scale=1.0,
                    q_atol_scale=1.0, on_step=None, context: str = "forward solve") -> IntegrateResult:
    """Integrate ``dy/dt = rhs(t, y)`` with a scipy solver; :func:`integrate`'s contract.

    ``config.control.rtol``/``atol``/``first_step``/``max_step``/``max_num_steps`` are passed on; a
    ``config.time.grid`` (an adjoint replaying a recorded solve) makes its points step boundaries:
    scipy restarts at each, trying the recorded step first. ``result.rejected`` stays 0 (scipy
    does not count rejections).
    """
    si = import_scipy_integrate()
    quad = q0 is not None
    t_start, t_end = float(t_eval[0]), float(t_eval[-1])
    direction = 1.0 if t_end >= t_start else -1.0
    blocks = [y0]  # outputs as collect_outputs appends them
    result = IntegrateResult(q_end=q0, step_times=[t_start], blocks=blocks)
    n_eval = len(t_eval)
    if n_eval == 1 or t_start == t_end:
        return result
    dtype, device, n = y0.dtype, y0.device, y0.numel()
    # The first evaluation runs with grad (when enabled) to see whether func depends on tensors
    # that require grad; every other one without (scipy needs plain numbers).
    probe: dict[str, Any] = {"pending": torch.is_grad_enabled(), "anchor": None, "bad_t": None}

    def fun(t, s):
        t = float(t)
        y = torch.tensor(s[:n], dtype=dtype, device=device)
        if probe["pending"]:
            probe["pending"] = False
            out = rhs(t, y)
            first = out[0] if quad else out
            if first.requires_grad:
                probe["anchor"] = first
        else:
            with torch.no_grad():
                out = rhs(t, y)
        parts = [p.detach().reshape(-1).to("cpu", torch.float64) for p in (out if quad else (out,))]
        v = np.concatenate([p.numpy() for p in parts]) if quad else parts[0].numpy().copy()
        if probe["bad_t"] is None and not np.isfinite(v).all():
            probe["bad_t"] = t
        return v

    state = y0.detach().reshape(-1).to("cpu", torch.float64).numpy().copy()
    y_atol = config.control.atol * (atol_scale.detach().to("cpu", torch.float64).numpy()
                            if isinstance(atol_scale, torch.Tensor) else atol_scale)
    kwargs = {"rtol": config.control.rtol, "atol": y_atol, "max_step": config.control.max_step}
    if quad:
        q_np = q0.detach().reshape(-1).to("cpu", torch.float64).numpy()
        state = np.concatenate([state, q_np])
        # The parameter integral is error-controlled like the state unless the seminorm is asked for.
        q_atol = _NO_ERROR_CONTROL if config.control.seminorm else config.control.atol * q_atol_scale
        kwargs["atol"] = np.concatenate([np.broadcast_to(y_atol, (n,)), np.full(q_np.size, q_atol)])
        if method.solver in _JAC_SPARSITY:
            # The quadrature feeds nothing back: its Jacobian columns are zero, so the finite
            # differences need only the state's columns (one VJP each, not one per parameter).
            from scipy.sparse import csc_matrix

            rows, cols = np.meshgrid(np.arange(state.size), np.arange(n), indexing="ij")
            kwargs["jac_sparsity"] = csc_matrix((np.ones(rows.size), (rows.ravel(), cols.ravel())),
                                                shape=(state.size, state.size))
    if method.solver == "LSODA":
        kwargs["min_step"] = method.min_step
    solver_cls = getattr(si, method.solver)
    replay = config.time.grid is not None
    bounds = [float(x) for x in config.time.grid] if replay else [t_start, t_end]

    y_prev, next_out, stop = y0, 1, False
    for a, b in zip(bounds[:-1], bounds[1:]):
        first = abs(b - a) if replay else config.control.first_step
        if first is not None:
            kwargs["first_step"] = min(abs(first), abs(b - a))
        solver = solver_cls(fun, a, state, b, **kwargs)
        while solver.status == "running":
            if result.steps >= config.control.max_num_steps:
                raise fail(f"reached max_num_steps={config.control.max_num_steps} at t={solver.t:.6g} "
                           f"before t={t_end:.6g} ({result.steps} accepted steps of scipy's "
                           f"{method.solver}). The problem may be stiff or the tolerances too tight; "
                           "raise options={'max_num_steps': ...}, loosen rtol/atol, or try "
                           "options={'solver': 'Radau'} / 'BDF' / 'LSODA'.", context, method)
            message = solver.step()
            if solver.status == "failed" or not np.isfinite(solver.y[:n]).all():
                if probe["bad_t"] is not None:
                    why = (f"the right-hand side returned NaN/Inf at t={probe['bad_t']:.6g}; check func "
                           "(e.g. log/sqrt/division of the state) or its parameters.")
                else:
                    why = (f"{message}" if solver.status == "failed" else "the state became NaN/Inf")
                    why += ("; the problem may be stiff for this solver (try options={'solver': "
                            "'Radau'} or 'BDF') or the tolerances too tight.")
                raise fail(f"scipy's {method.solver} failed at t={solver.t:.6g}: {why}", context, method)
            t0, t1 = float(solver.t_old), float(solver.t)
            y1 = torch.tensor(solver.y[:n], dtype=dtype, device=device)
            result.steps += 1
            result.step_times.append(t1)
            make_step = lambda: ScipyDenseStep(t0, t1, y_prev, y1, solver.dense_output(), n)
            next_out, step = collect_outputs(blocks, t_eval, next_out, t0, t1, direction, y1, make_step,
                                             check_finite=False, context=context, method=method)
            stop = on_step is not None and on_step(step if step is not None else make_step()) is True
            y_prev = y1
            if stop:  # on_step ended the solve (an event was found)
                break
        state = solver.y
        if stop:
            break

    if quad:
        result.q_end = torch.tensor(state[n:], dtype=q0.dtype, device=q0.device)
    anchors = [x for x in (y0, probe["anchor"]) if x is not None and x.requires_grad]
    if anchors and torch.is_grad_enabled():
        message = _no_backprop_message(method)
        ys = result.ys
        # Tied to the graph of its inputs only to fail clearly if a gradient is ever asked for.
        tied = RefuseBackward.apply(ValueError, message, len(ys) - 1, *ys[1:], *anchors)
        result = IntegrateResult(ys=ys[:1] + list(tied),
                                 q_end=result.q_end, step_times=result.step_times, steps=result.steps,
                                 rejected=result.rejected)
    return result
