"""Solvers: Butcher tableaux, step-size control, dense output and the stepping loop."""
from .controller import PIController, error_ratio, initial_step
from .dense import DenseSolution, DenseStep, HermiteDenseStep, PolynomialDenseStep, RKDenseStep
from .loop import IntegrateResult, SolverConfig, dense_step, integrate, make_grid, rk_step
from .tableau import ADAPTIVE, FIXED, TABLEAUX, ButcherTableau

__all__ = [
    "ADAPTIVE", "FIXED", "TABLEAUX", "ButcherTableau", "PIController", "error_ratio", "initial_step",
    "DenseSolution", "DenseStep", "HermiteDenseStep", "PolynomialDenseStep", "RKDenseStep",
    "IntegrateResult", "SolverConfig", "dense_step", "integrate", "make_grid", "rk_step",
]
