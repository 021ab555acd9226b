"""Calibration of ``interpolating``'s dense-output guard (issue 16, item 3): the guard's figure
(``stats.dense_output_error``) against the real error of the gradient dL/dy0, on stiff and
non-stiff problems, fixed and adaptive steps, float64 and float32.

Columns: the figure; dL/dy0's relative error against the converged gradient (radauIIA5's discrete
gradient at a fine step for the stiff problems, dopri8 at 1e-12 for the others) and against
``backprop`` with the same method and steps (the exact gradient of the same discrete solve);
``backprop``'s own error; whether the guard warned (threshold ``guard_rtol=1e-2``).

    python benchmarks/calib_interpolating.py              # every case (~10 min on 2 shared cores)
    python benchmarks/calib_interpolating.py rober:trbdf2:0.05 lotka:dopri5:tol1e-3:f32
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

import pyode_bridge as pob

F64 = torch.float64


def robertson(t, y):
    return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2])


def van_der_pol(mu):
    return lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def fast_slow(t, y):
    """y0 follows sin(y1) at rate 1000."""
    return torch.stack([-1000.0 * (y[0] - torch.sin(y[1])), 0.5 * y[0] - 0.1 * y[1] + torch.cos(t)])


def damped_oscillator(t, y):
    return torch.stack([y[1], -y[0] - 0.1 * y[1]])


def lotka_volterra(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


# name: (func, y0, t, loss weights per component, fine step of the stiff reference or None)
PROBLEMS = {
    "robertson": (robertson, [1.0, 0.0, 0.0], [0.0, 1.0, 10.0], [1.0, 1e4, 1.0], 0.0025),
    "vdp100": (van_der_pol(100.0), [2.0, 0.0], [0.0, 1.0, 2.0], [1.0, 1.0], 0.0005),
    "fastslow-transient": (fast_slow, [0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 1.0], 0.0005),
    "fastslow-manifold": (fast_slow, [math.sin(1.0), 1.0], [0.0, 1.0, 3.0], [1.0, 1.0], 0.0005),
    "oscillator": (damped_oscillator, [1.0, 0.0], [0.0, 5.0, 10.0], [1.0, 1.0], None),
    "lotka": (lotka_volterra, [3.0, 1.0], [0.0, 2.0, 4.0], [1.0, 1.0], None),
    "vdp1": (van_der_pol(1.0), [2.0, 0.0], [0.0, 3.0, 6.0], [1.0, 1.0], None),
}

CASES = """robertson:radauIIA5:0.05 robertson:radauIIA5:0.01 robertson:trbdf2:0.05 robertson:trbdf2:0.01
robertson:implicit_euler:0.05 vdp100:implicit_euler:0.01 vdp100:radauIIA5:0.01 vdp100:radauIIA5:0.05
vdp100:trbdf2:0.01 fastslow-transient:radauIIA5:0.1 fastslow-manifold:radauIIA5:0.1
fastslow-transient:radauIIA5:0.02 fastslow-transient:radauIIA3:0.05 fastslow-manifold:radauIIA3:0.05
fastslow-transient:gl6:0.05 fastslow-transient:trbdf2:0.05 fastslow-manifold:trbdf2:0.05
fastslow-transient:trbdf2:0.01 fastslow-transient:sdirk2:0.02 fastslow-transient:implicit_euler:0.01
oscillator:rk4:0.1 oscillator:rk4:0.25 oscillator:rk4:0.5 oscillator:gl4:0.1 oscillator:radauIIA5:0.2
oscillator:dopri5:tol1e-4 lotka:rk4:0.2 lotka:rk4:0.1 lotka:rk4:0.05 lotka:dopri5:tol1e-2
lotka:dopri5:tol1e-3 lotka:dopri5:tol1e-6 lotka:tsit5:tol1e-5 lotka:bosh3:tol1e-4 lotka:dopri8:tol1e-3
lotka:dopri8:tol1e-4 lotka:dopri8:tol1e-6 lotka:dopri5:tol1e-5:f32 lotka:rk4:0.1:f32 vdp1:dopri5:tol1e-2
vdp1:dopri5:tol1e-3 vdp1:dopri5:tol1e-5 vdp1:tsit5:tol1e-4 vdp1:dopri8:tol1e-4 vdp1:rk4:0.2 vdp1:rk4:0.1
vdp1:gl6:0.1 vdp1:gl4:0.1 vdp1:radauIIA3:0.05 vdp1:radauIIA5:0.1""".split()


def grad(problem, method, sensitivity, options, dtype=F64, rtol=1e-7, atol=1e-9, stats=None):
    """dL/dy0 (float64) of L = sum_k w . y(t_k), k >= 1."""
    func, y0, t, w, _ = PROBLEMS[problem]
    f = func if dtype == F64 else (lambda tt, yy: func(tt, yy.double()).to(dtype))
    y = torch.tensor(y0, dtype=dtype, requires_grad=True)
    ys = pob.odeint(f, y, torch.tensor(t, dtype=dtype), method=method, options=options, rtol=rtol,
                    atol=atol, sensitivity=sensitivity, stats=stats)
    return torch.autograd.grad((ys[1:] * torch.tensor(w, dtype=dtype)).sum(), y)[0].double()


def reference(problem):
    fine = PROBLEMS[problem][4]
    if fine is not None:
        return grad(problem, "radauIIA5", "backprop", {"step_size": fine})
    return grad(problem, "dopri8", "backprop", {}, rtol=1e-12, atol=1e-12)


def row(case, refs):
    problem, method, step, *rest = case.split(":")
    dtype = torch.float32 if rest and rest[0] == "f32" else F64
    if step.startswith("tol"):
        options, tol = {}, float(step[3:])
        kw = dict(rtol=tol, atol=tol * 1e-2)
    else:
        options, kw = {"step_size": float(step)}, {}
    if problem not in refs:
        refs[problem] = reference(problem)
    ref = refs[problem]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    bp = grad(problem, method, "backprop", options, dtype, **kw)
    stats = pob.SolveStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = grad(problem, method, "interpolating", options, dtype, stats=stats, **kw)
    warned = any("(interpolating)" in str(w.message) for w in caught)
    return (f"| {problem} | {method} | {step} | {str(dtype)[6:]} | {stats.dense_output_error:.2g} | "
            f"{rel(g, ref):.2g} | {rel(g, bp):.2g} | {rel(bp, ref):.2g} | {'warns' if warned else 'quiet'} |")


def main(cases):
    print("| problem | method | step / tol | dtype | guard figure | error vs converged | vs backprop "
          "| backprop's error | guard |")
    print("|---|---|---|---|---|---|---|---|---|")
    refs = {}
    for case in cases:
        print(row(case, refs), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or CASES)
