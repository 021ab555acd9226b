"""Where small vector fields spend their time: per-step overhead, many output times, adjoint sweeps.

The four rows of issue 12, each run side by side with the peers in the same process, one intra-op
thread, repetitions interleaved (every contender once per round, in a rotating order), medians of
the per-round ratios printed (absolute times on a shared machine are noise; ratios taken within one
round are not):

  step     rk4 on the trivial field ``-y`` (10-dim), 1000 steps, forward: microseconds per step,
           ratio to torchdiffeq (torchdyn and diffrax-jit as further columns).
  outputs  MLP 2-64-2 tanh, batch 100, dopri5 rtol = atol = 1e-5, forward + backward (autograd
           through the solver; loss over every output): time with 1000 output times / with 2,
           for every library (NFE is the same: outputs come from dense output).
  adjoint  rk4, 1000 steps of ``dy/dt = -a * y`` (10-dim, ``a`` a parameter), forward+backward of
           each memory-lean gradient method / ``backprop``.
  mlp      MLP 2-64-2 tanh, batch 100, dopri5 1e-5, forward + backward, ratio to torchdiffeq
           ``odeint``; pyode-bridge also with ``options={"compile": True}`` where available, and
           torchode / diffrax-jit (``RecursiveCheckpointAdjoint``) as columns.

Peers that do not import are left out (diffrax needs ``pip install jax diffrax``: CPU wheels).

    python benchmarks/bench_overhead.py [--rows step outputs adjoint mlp] [--reps 30]
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

# One thread for XLA too (must be set before jax is imported).
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import torch  # noqa: E402
import torchdiffeq  # noqa: E402
from torch import nn  # noqa: E402
from workloads import median  # noqa: E402

import pyode_bridge as pob  # noqa: E402

try:  # optional peers: a failed import drops the column
    import torchode
except Exception:  # noqa: BLE001
    torchode = None
try:
    from torchdyn.numerics import odeint as torchdyn_odeint
except Exception:  # noqa: BLE001
    torchdyn_odeint = None
try:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np
except Exception:  # noqa: BLE001
    diffrax = None


# ------------------------------------------------------------------------------------------------
# harness


CLOCK = {"process": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def interleaved(contenders: dict, reps: int, ref: str):
    """Time every ``fn`` in ``contenders`` (name -> zero-argument callable) ``reps`` times, one of
    each per round in a rotating order. Returns ``{name: (median seconds, median of the per-round
    ratios to ref)}``."""
    names = list(contenders)
    for fn in contenders.values():  # warm-up (and jit compilation)
        fn()
        fn()
    times = {k: [] for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            start = clock()
            contenders[k]()
            times[k].append(clock() - start)
    out = {k: (median(times[k]), per_round(times, k, ref)) for k in names}
    interleaved.last_times = times
    return out


def per_round(times: dict, a: str, b: str) -> float:
    """Median over rounds of ``time[a] / time[b]`` (both measured in the same round)."""
    return median([x / y for x, y in zip(times[a], times[b])])


def show(title: str, res: dict, unit: float = 1e3, unit_name: str = "ms", ref: str = ""):
    print(f"\n== {title}")
    for k, (t, r) in res.items():
        print(f"  {k:<44} {t * unit:10.2f} {unit_name}   ratio to {ref}: {r:6.3f}")


def compile_supported() -> bool:
    """Whether this pyode-bridge has the opt-in compiled step (``options={"compile": True}``)."""
    f = lambda t, y: -y  # noqa: E731
    try:
        pob.odeint(f, torch.ones(2), torch.tensor([0.0, 0.1]), method="rk4",
                   options={"step_size": 0.05, "compile": True})
        return True
    except (ValueError, TypeError):
        return False


# ------------------------------------------------------------------------------------------------
# diffrax helpers


def _diffrax_rk4():
    class RK4(diffrax.AbstractERK):
        """Kutta's 3/8 rule, the tableau torchdiffeq and pyode-bridge call ``rk4``."""

        tableau = diffrax.ButcherTableau(
            c=np.array([1 / 3, 2 / 3, 1.0]), b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
            b_error=np.zeros(4),
            a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])))
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return RK4()


def _jax_mlp(torch_net):
    """The same weights as a pure jax function ``f(t, y, params)`` and its params."""
    ws = [(jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
          for m in torch_net if isinstance(m, nn.Linear)]

    def f(t, y, params):
        (w1, b1), (w2, b2) = params
        return jnp.tanh(y @ w1.T + b1) @ w2.T + b2

    return f, ws


def _diffrax_mlp_fwd_bwd(torch_net, y0, ts, tol, max_steps=4096):
    f, params = _jax_mlp(torch_net)
    term = diffrax.ODETerm(f)
    solver = diffrax.Dopri5()
    ctrl = diffrax.PIDController(rtol=tol, atol=tol)
    ts = jnp.asarray(ts.numpy())

    @jax.jit
    def loss_grad(params, y0):
        def loss(params, y0):
            sol = diffrax.diffeqsolve(term, solver, ts[0], ts[-1], None, y0, args=params,
                                      saveat=diffrax.SaveAt(ts=ts), stepsize_controller=ctrl,
                                      max_steps=max_steps)
            return jnp.mean(sol.ys[1:] ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, y0)

    y0j = jnp.asarray(y0.numpy())
    return lambda: jax.block_until_ready(loss_grad(params, y0j))


# ------------------------------------------------------------------------------------------------
# the eager floor


_DOPRI5 = pob.solvers.TABLEAUX["dopri5"]  # the coefficients only; the loop below is its own


def minimal_dopri5(f, y, t0: float, t1: float, tol: float, nfe: list):
    """What eager PyTorch costs at least for a dopri5 solve: the stages, the error norm with one
    host sync per step, Hairer's initial step and the controller pyode-bridge uses, on the user's
    tensor shape - and nothing else (no input checks, no NaN checks, no dense output, no stats,
    no flat state and its views). A reference for the MLP row, not a solver (it assumes
    t1 > t0 and accepts the first step it is given). ``nfe[0]`` counts the evaluations."""
    def call(t, z):
        nfe[0] += 1
        return f(torch.full((), t), z)

    def comb(row, ks, h):
        terms = [(h * a, k) for a, k in zip(row, ks) if a != 0.0]
        inc = terms[0][1] * terms[0][0]
        for c, k in terms[1:]:
            inc = torch.add(inc, k, alpha=c)
        return inc

    root_n = y.numel() ** 0.5
    k0 = call(t0, y)
    with torch.no_grad():
        scale = y.abs() * tol + tol
        d0 = float(torch.linalg.vector_norm(y / scale)) / root_n
        d1 = float(torch.linalg.vector_norm(k0 / scale)) / root_n
        h0 = min(0.01 * d0 / d1, t1 - t0)
        d2 = float(torch.linalg.vector_norm((call(t0 + h0, y + h0 * k0) - k0) / scale)) / root_n / h0
        h = min(100 * h0, (0.01 / max(d1, d2)) ** (1 / 5), t1 - t0)
    t, prev = t0, None
    while t < t1:
        if t + 1.01 * h >= t1:
            h = t1 - t
        ks = [k0]
        for i in range(1, 7):
            yi = y + comb(_DOPRI5.a[i], ks, h)
            ks.append(call(t + _DOPRI5.c[i] * h, yi))
        with torch.no_grad():
            err = comb(_DOPRI5.b_err, ks, h)
            r = float(torch.linalg.vector_norm(err / (torch.maximum(y.abs(), yi.abs()) * tol + tol))) / root_n
        factor = 0.9 * r ** (-1 / 5) if prev is None else 0.9 * r ** -0.17 * prev ** 0.04
        if r <= 1.0:
            t, y, k0, prev = t + h, yi, ks[-1], max(r, 1e-4)
        h *= min(10.0, max(0.2, factor))
    return y


# ------------------------------------------------------------------------------------------------
# rows


def row_step(reps: int, with_compile: bool = False):
    n_steps, h = 1000, 1e-3
    y0 = torch.randn(10)
    t = torch.tensor([0.0, 1.0])
    f = lambda t, y: -y  # noqa: E731
    c = {
        "torchdiffeq rk4": lambda: torchdiffeq.odeint(f, y0, t, method="rk4", options={"step_size": h}),
        "pyode-bridge rk4": lambda: pob.odeint(f, y0, t, method="rk4", options={"step_size": h}),
    }
    if with_compile:
        c["pyode-bridge rk4, compile"] = lambda: pob.odeint(f, y0, t, method="rk4",
                                                            options={"step_size": h, "compile": True})
    if torchdyn_odeint is not None:
        t_span = torch.linspace(0.0, 1.0, n_steps + 1)
        c["torchdyn rk4 (saves every step)"] = lambda: torchdyn_odeint(f, y0, t_span, solver="rk4")
    if diffrax is not None:
        term = diffrax.ODETerm(lambda t, y, args: -y)
        rk4 = _diffrax_rk4()

        @jax.jit
        def solve(y0):
            return diffrax.diffeqsolve(term, rk4, 0.0, 1.0, h, y0,
                                       stepsize_controller=diffrax.ConstantStepSize(),
                                       max_steps=n_steps + 8).ys

        y0j = jnp.asarray(y0.numpy())
        c["diffrax rk4 (jit)"] = lambda: jax.block_until_ready(solve(y0j))
    res = interleaved(c, reps, "torchdiffeq rk4")
    res = {k: (v / n_steps, r) for k, (v, r) in res.items()}
    show(f"rk4, dy/dt = -y (10-dim), {n_steps} steps, forward: per step", res, 1e6, "us",
         "torchdiffeq")
    return res


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))


def row_outputs(reps: int):
    net = _mlp()
    y0 = torch.randn(100, 2)
    tol = 1e-5
    f = lambda t, y: net(y)  # noqa: E731
    c = {}
    nfe = {}
    for n_out in (2, 1000):
        t = torch.linspace(0.0, 1.0, n_out)

        def pob_run(t=t, n_out=n_out):
            st = pob.SolveStats()
            y = y0.clone().requires_grad_(True)
            ys = pob.odeint(f, y, t, rtol=tol, atol=tol, method="dopri5", stats=st)
            ys[1:].square().mean().backward()
            nfe[("pyode-bridge", n_out)] = st.nfe_forward

        def tdq_run(t=t):
            y = y0.clone().requires_grad_(True)
            ys = torchdiffeq.odeint(f, y, t, rtol=tol, atol=tol, method="dopri5")
            ys[1:].square().mean().backward()

        c[f"pyode-bridge {n_out}"] = pob_run
        c[f"torchdiffeq {n_out}"] = tdq_run
        if torchode is not None:
            term = torchode.ODETerm(lambda t, y: net(y))
            solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term),
                                              torchode.IntegralController(atol=tol, rtol=tol, term=term))
            t_eval = t.expand(y0.shape[0], -1).contiguous()

            def tode_run(solver=solver, t_eval=t_eval):
                y = y0.clone().requires_grad_(True)
                sol = solver.solve(torchode.InitialValueProblem(y0=y, t_eval=t_eval))
                sol.ys[:, 1:].square().mean().backward()

            c[f"torchode {n_out}"] = tode_run
        if diffrax is not None:
            c[f"diffrax {n_out}"] = _diffrax_mlp_fwd_bwd(net, y0, t, tol)
    res = interleaved(c, reps, "pyode-bridge 2")
    print(f"\n== MLP 2-64-2, batch 100, dopri5 1e-5, fwd+bwd (backprop): 1000 vs 2 output times "
          f"(pyode-bridge NFE {nfe[('pyode-bridge', 2)]} / {nfe[('pyode-bridge', 1000)]})")
    libs = sorted({k.rsplit(" ", 1)[0] for k in c})
    out = {}
    for lib in libs:
        t2, t1000 = res[f"{lib} 2"][0], res[f"{lib} 1000"][0]
        r = per_round(interleaved.last_times, f"{lib} 1000", f"{lib} 2")
        out[lib] = (t2, t1000, r)
        print(f"  {lib:<16} 2 outputs {t2 * 1e3:8.2f} ms   1000 outputs {t1000 * 1e3:8.2f} ms   "
              f"1000/2: {r:6.2f}")
    return out


def row_adjoint(reps: int):
    a = torch.tensor(0.7, requires_grad=True)
    f = lambda t, y: -a * y  # noqa: E731
    y0 = torch.randn(10)
    t = torch.tensor([0.0, 1.0])
    h = 1e-3
    c = {}
    for sens in ("backprop", "checkpointed", "interpolated", "interpolating", "backsolve"):
        def run(sens=sens):
            y = y0.clone().requires_grad_(True)
            ys = pob.odeint(f, y, t, method="rk4", options={"step_size": h}, sensitivity=sens,
                            adjoint_params=(a,))
            ys[-1].square().sum().backward()
            a.grad = None
        c[sens] = run
    res = interleaved(c, reps, "backprop")
    show("rk4, 1000 steps of dy/dt = -a y (10-dim), fwd+bwd by gradient method", res, ref="backprop")
    return res


def row_mlp(reps: int, with_compile: bool):
    net = _mlp()
    y0 = torch.randn(100, 2)
    tol = 1e-5
    t = torch.tensor([0.0, 1.0])
    f = lambda t, y: net(y)  # noqa: E731

    def fwd_bwd(lib, **kw):
        def run():
            y = y0.clone().requires_grad_(True)
            ys = lib.odeint(f, y, t, rtol=tol, atol=tol, method="dopri5", **kw)
            ys[-1].square().mean().backward()
        return run

    c = {"torchdiffeq odeint": fwd_bwd(torchdiffeq), "pyode-bridge backprop": fwd_bwd(pob)}
    nfe_floor, st = [0], pob.SolveStats()
    minimal_dopri5(f, y0, 0.0, 1.0, tol, nfe_floor)
    pob.odeint(f, y0, t, rtol=tol, atol=tol, method="dopri5", stats=st)
    if nfe_floor[0] == st.nfe_forward:  # the same steps: a fair floor

        def floor_run():
            y = y0.clone().requires_grad_(True)
            minimal_dopri5(f, y, 0.0, 1.0, tol, [0]).square().mean().backward()

        c["eager floor: minimal dopri5 loop (no checks)"] = floor_run
    else:
        print(f"(minimal dopri5 loop left out: {nfe_floor[0]} NFE against pyode-bridge's {st.nfe_forward})")
    if with_compile:
        c["pyode-bridge backprop, compile"] = fwd_bwd(pob, options={"compile": True})
        c["pyode-bridge checkpointed, compile"] = fwd_bwd(pob, options={"compile": True},
                                                           sensitivity="checkpointed")
    if torchode is not None:
        term = torchode.ODETerm(lambda t, y: net(y))
        solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term),
                                          torchode.IntegralController(atol=tol, rtol=tol, term=term))
        t_eval = t.expand(y0.shape[0], -1).contiguous()

        def tode_run():
            y = y0.clone().requires_grad_(True)
            sol = solver.solve(torchode.InitialValueProblem(y0=y, t_eval=t_eval))
            sol.ys[:, -1].square().mean().backward()

        c["torchode (per-sample steps)"] = tode_run
    if diffrax is not None:
        c["diffrax jit (RecursiveCheckpointAdjoint)"] = _diffrax_mlp_fwd_bwd(net, y0, t, tol)
    res = interleaved(c, reps, "torchdiffeq odeint")
    show("MLP 2-64-2, batch 100, dopri5 1e-5, fwd+bwd", res, ref="torchdiffeq")
    return res


def row_nfe(reps: int):
    """Backward NFE (and forward NFE) of every memory-lean method as the number of output times
    grows (MLP 2-64-2, batch 100, dopri5 1e-5, loss over every output): the optimize-then-
    discretize methods solve the adjoint interval by interval, checkpointed does not."""
    net = _mlp()
    y0 = torch.randn(100, 2)
    f = lambda t, y: net(y)  # noqa: E731
    methods = ["checkpointed", "interpolated", "interpolating", "backsolve"]
    print("\n== backward NFE by output count (MLP 2-64-2, batch 100, dopri5 1e-5; forward NFE in "
          "parentheses)")
    print("  outputs   " + "".join(f"{m:>16}" for m in methods))
    out = {}
    for n_out in (2, 11, 101):
        t = torch.linspace(0.0, 1.0, n_out)
        cells = []
        for sens in methods:
            st = pob.SolveStats()
            y = y0.clone().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ys = pob.odeint(f, y, t, rtol=1e-5, atol=1e-5, sensitivity=sens, stats=st)
                ys[1:].square().mean().backward()
            out[(n_out, sens)] = (st.nfe_forward, st.nfe_backward)
            cells.append(f"{st.nfe_backward:>8} ({st.nfe_forward:>3})")
        print(f"  {n_out:>7}   " + "".join(f"{c:>16}" for c in cells))
    return out


_COLD = """
import os, sys, time, torch
from torch import nn
import pyode_bridge as pob
torch.set_num_threads(1)
torch.manual_seed(1)
net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
y0, t = torch.randn(100, 2), torch.tensor([0.0, 1.0])
f = lambda t, y: net(y)
opts = eval(sys.argv[1])
out = []
for _ in range(2):
    start = time.perf_counter()
    y = y0.clone().requires_grad_(True)
    pob.odeint(f, y, t, rtol=1e-5, atol=1e-5, options=opts)[-1].square().mean().backward()
    out.append(time.perf_counter() - start)
print(out[0], out[1])
"""


def cold_start():
    """Wall seconds of the first and second solve (fwd+bwd, MLP, dopri5) in a fresh process,
    eager and compiled, with an empty inductor cache (what a user's first run pays)."""
    import subprocess
    import sys
    import tempfile

    print("\n== compiled step, cold start (fresh process, empty inductor cache; first / second solve)")
    for name, opts in (("eager", "{}"), ("compile=True (inductor)", "{'compile': True}"),
                       ("compile aot_eager", "{'compile': {'backend': 'aot_eager'}}")):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            res = subprocess.run([sys.executable, "-c", _COLD, opts], capture_output=True, text=True,
                                 env=env, timeout=900)
        if res.returncode != 0:
            print(f"  {name}: failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        first, second = (float(x) for x in res.stdout.split()[-2:])
        print(f"  {name:<28} first {first:8.3f} s   second {second * 1e3:8.2f} ms")


ROWS = {"step": row_step, "outputs": row_outputs, "adjoint": row_adjoint, "mlp": row_mlp,
        "nfe": row_nfe}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                    help="step, outputs, adjoint, mlp: timed (issue 12's rows); nfe: counts only")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=list(CLOCK), default="process",
                    help="process: CPU time of this process (default; robust to other jobs on a "
                         "shared machine); wall: elapsed time")
    ap.add_argument("--cold-start", action="store_true", help="also time the first compiled solve")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    global clock
    clock = CLOCK[args.clock]
    has_compile = compile_supported()
    print(f"pyode_bridge from {os.path.dirname(pob.__file__)}, clock {args.clock}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}, "
          f"torchode {'yes' if torchode else 'no'}, torchdyn {'yes' if torchdyn_odeint else 'no'}, "
          f"diffrax {diffrax.__version__ if diffrax else 'no'}, compiled step "
          f"{'yes' if has_compile else 'no'}")
    for r in args.rows:
        if r == "mlp":
            row_mlp(args.reps, has_compile)
        elif r == "step":
            row_step(args.reps, has_compile)
        else:
            ROWS[r](args.reps)
    if args.cold_start and has_compile:
        cold_start()


if __name__ == "__main__":
    main()
