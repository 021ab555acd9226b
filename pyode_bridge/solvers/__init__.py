"""Solvers: Butcher tableaux, step-size control, dense output and the stepping loop with its
steppers (Runge-Kutta, Adams); scipy's solvers behind its own loop; :data:`METHODS`, every name
``odeint(method=...)`` accepts."""
from .adams import ADAMS_METHODS, AdamsMethod, AdamsStepper, adams_weights
from .config import AccelOptions, ControlOptions, NewtonOptions, SolverConfig, TimeOptions
from .controller import PIController, error_ratio, initial_step, quadrature_error_ratio
from .dense import DenseSolution, DenseStep, HermiteDenseStep, PolynomialDenseStep, RKDenseStep
from .implicit import implicit_rk_step
from .loop import IntegrateResult, dense_step, integrate, make_grid, rk_step
from .method import SolverMethod, Stepper
from .registry import METHODS
from .scipy_solver import SCIPY_SOLVERS, ScipyDenseStep, ScipyMethod, integrate_scipy
from .tableau import ADAPTIVE, FIXED, IMPLICIT, TABLEAUX, ButcherTableau

__all__ = [
    "ADAPTIVE", "FIXED", "IMPLICIT", "TABLEAUX", "ButcherTableau", "implicit_rk_step", "PIController",
    "error_ratio", "quadrature_error_ratio", "initial_step",
    "DenseSolution", "DenseStep", "HermiteDenseStep", "PolynomialDenseStep", "RKDenseStep",
    "SolverConfig", "ControlOptions", "TimeOptions", "NewtonOptions", "AccelOptions",
    "IntegrateResult", "dense_step", "integrate", "make_grid", "rk_step",
    "METHODS", "SolverMethod", "Stepper", "AdamsMethod", "ADAMS_METHODS", "adams_weights", "AdamsStepper",
    "ScipyMethod", "ScipyDenseStep", "SCIPY_SOLVERS", "integrate_scipy",
]
