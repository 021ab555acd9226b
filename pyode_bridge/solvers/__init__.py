"""Solvers: Butcher tableaux, step-size control, dense output and the stepping loop; Adams and
scipy methods with their own loops; :data:`METHODS`, every name ``odeint(method=...)`` accepts."""
from .adams import ADAMS_METHODS, AdamsMethod, adams_weights, integrate_adams
from .config import AccelOptions, ControlOptions, NewtonOptions, SolverConfig, TimeOptions
from .controller import PIController, error_ratio, initial_step, quadrature_error_ratio
from .dense import DenseSolution, DenseStep, HermiteDenseStep, PolynomialDenseStep, RKDenseStep
from .implicit import implicit_rk_step
from .loop import IntegrateResult, dense_step, integrate, make_grid, rk_step
from .method import SolverMethod
from .registry import METHODS
from .scipy_solver import SCIPY_SOLVERS, ScipyDenseStep, ScipyMethod, integrate_scipy
from .tableau import ADAPTIVE, FIXED, IMPLICIT, TABLEAUX, ButcherTableau

__all__ = [
    "ADAPTIVE", "FIXED", "IMPLICIT", "TABLEAUX", "ButcherTableau", "implicit_rk_step", "PIController",
    "error_ratio", "quadrature_error_ratio", "initial_step",
    "DenseSolution", "DenseStep", "HermiteDenseStep", "PolynomialDenseStep", "RKDenseStep",
    "SolverConfig", "ControlOptions", "TimeOptions", "NewtonOptions", "AccelOptions",
    "IntegrateResult", "dense_step", "integrate", "make_grid", "rk_step",
    "METHODS", "SolverMethod", "AdamsMethod", "ADAMS_METHODS", "adams_weights", "integrate_adams",
    "ScipyMethod", "ScipyDenseStep", "SCIPY_SOLVERS", "integrate_scipy",
]
