"""Every gradient method of pyode-bridge side by side, and two results of the papers at small scale.

Sub-commands:

``compare`` (the default)
    For one model and batch (``--model conv|mlp|cnf``), run each gradient method (``--methods``)
    once under a saved-memory probe and ``--repeats`` times under a stopwatch, and report the
    gradient's relative error against ``checkpointed`` (the exact gradient of the discrete
    forward), forward/backward function evaluations (NFE), time per iteration and the memory
    kept for the backward pass (storages the graph / the method holds after the forward, measured
    with :func:`pyode_bridge.memory.measure_saved_bytes` on the CPU, with the CUDA allocator on a
    GPU, where the peak of forward + backward is reported too).

``anode``
    ANODE's point (Gholami et al., 2019): on a ReLU convolutional ODE block whose weights are
    scaled up, solving the forward ODE backwards in time (``backsolve``, the reverse dynamic method
    of Chen et al.) gives a wrong gradient, or its reverse solve fails, while ``checkpointed``
    equals ``backprop`` to round-off (float64). The backsolve guard's warning is captured and
    reported, and ``Backsolve(on_instability="raise")`` is shown to raise.

``fig2``
    IRDM's Figure 2 (Daulbaev et al., 2020): the relative l1 error of the interpolated gradient
    against the number of Chebyshev nodes and the dopri5 tolerance, on the cubic spiral
    ``y' = A y^3`` (``A = [[-0.1, 2], [-2, -0.1]]``), with a small neural ODE fitted to that vector
    field (or ``A`` itself as the parameter); ground truth: backprop at tolerance 1e-10.

``all``
    ``compare`` (conv), ``anode`` and ``fig2`` with their defaults.

Every sub-command prints its table and writes ``<name>.json``, ``<name>.csv`` and ``<name>.png``
into ``--out`` (default ``outputs/compare_sensitivities``).

Examples::

    python examples/compare_sensitivities.py --model conv --batch 16 --channels 32
    python examples/compare_sensitivities.py compare --model cnf --methods backsolve interpolated:8
    python examples/compare_sensitivities.py anode --scales 1 3 10
    python examples/compare_sensitivities.py fig2 --nodes 4 8 16 32 64
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from _common import (
    SENSITIVITY_HELP,
    add_run_args,
    fmt_bytes,
    fmt_sci,
    format_table,
    is_adaptive,
    mark_zeros,
    median,
    parse_sensitivity,
    plt,
    positive,
    progress,
    sensitivity_arg,
    setup_run,
    solver_arg,
    solver_label,
    sync,
    write_csv,
    write_json,
    zero_floor,
)
from torch import nn

import pyode_bridge as pob
from pyode_bridge.data import TOY_DATASETS, sample_toy
from pyode_bridge.memory import measure_saved_bytes
from pyode_bridge.models.cnf import CNF
from pyode_bridge.nn import ODEConvFunc

SCRIPT = "compare_sensitivities"
DEFAULT_METHODS = ["backprop", "checkpointed", "interpolated:16", "interpolated:auto", "interpolating",
                   "interpolating:ckpt", "backsolve"]
SPIRAL_A = [[-0.1, 2.0], [-2.0, -0.1]]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------
# problems: a loss whose gradient every method computes


def flat(tensors) -> torch.Tensor:
    """One flat float64 vector of a list of gradients (``None`` -> zeros is not expected here)."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64).cpu() for t in tensors])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().sum() / b.abs().sum().clamp_min(1e-300)).item()


class FuncNet(nn.Module):
    """``func(t, y) = net(y)`` as a module (so the adjoint methods find its parameters)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


class StateProblem:
    """``loss = sum_k mean(y(t_k)^2)`` over the output times ``t_1..t_K`` of ``odeint(func, y0, t)``;
    gradient with respect to ``y0`` and ``func``'s parameters."""

    def __init__(self, func: nn.Module, y0: torch.Tensor, t: torch.Tensor, method: str, tol: float,
                 options: dict | None = None):
        self.func, self.y0, self.t = func, y0.requires_grad_(True), t
        self.method, self.tol, self.options = method, tol, options
        self.inputs = [self.y0] + list(func.parameters())
        self.exclude = [func, self.y0]
        self.stats = pob.SolveStats()

    def loss(self, sens) -> torch.Tensor:
        ys = pob.odeint(self.func, self.y0, self.t, rtol=self.tol, atol=self.tol, method=self.method,
                        options=self.options, sensitivity=sens, stats=self.stats)
        return sum(ys[k].pow(2).mean() for k in range(1, len(self.t)))


class CNFProblem:
    """The FFJORD loss ``-mean log p(x)`` of a 2-D CNF on a batch of toy data; gradient with respect
    to the flow's parameters."""

    def __init__(self, flow: CNF, x: torch.Tensor):
        self.flow, self.x = flow, x
        self.inputs = list(flow.parameters())
        self.exclude = [flow, x]

    @property
    def stats(self):
        return self.flow.stats

    def loss(self, sens) -> torch.Tensor:
        self.flow.configure(sensitivity=sens)
        return -self.flow.log_prob(self.x).mean()


def build_problem(args, device, dtype):
    """The ``--model`` problem with its sizes, on ``device`` in ``dtype``."""
    torch.manual_seed(args.seed)
    if args.model == "conv":
        func = ODEConvFunc(args.channels, weight_norm=True)
        y0 = torch.randn(args.batch, args.channels, args.size, args.size)
        tol = 1e-3 if args.tol is None else args.tol
        desc = (f"conv: ODEConvFunc ({args.channels} ch, ReLU, weight norm), batch "
                f"{args.batch}x{args.channels}x{args.size}x{args.size}, {solver_label(args.solver, tol, args.step)}")
    elif args.model == "mlp":
        net = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.hidden),
                            nn.Tanh(), nn.Linear(args.hidden, args.dim))
        func = FuncNet(net)
        y0 = torch.randn(args.batch, args.dim)
        tol = 1e-5 if args.tol is None else args.tol
        desc = (f"mlp: {args.dim}-{args.hidden}-{args.hidden}-{args.dim} tanh, batch {args.batch}, "
                f"{solver_label(args.solver, tol, args.step)}")
    else:
        tol = 1e-5 if args.tol is None else args.tol
        flow = CNF(2, hidden=(args.hidden,) * 3, T=0.5, rtol=tol, atol=tol, method=args.solver,
                   options=_fixed_step(args))
        x = sample_toy(args.data, args.batch, seed=args.seed)
        desc = (f"cnf: FFJORD 2-{args.hidden}x3-2 concatsquash tanh, exact trace, T=0.5, {args.data} "
                f"batch {args.batch}, {solver_label(args.solver, tol, args.step)}")
        return CNFProblem(flow.to(device, dtype), x.to(device, dtype)), desc
    t = torch.linspace(0.0, 1.0, args.outputs, dtype=dtype, device=device)
    return StateProblem(func.to(device, dtype), y0.to(device, dtype), t, args.solver, tol, _fixed_step(args)), desc


def _fixed_step(args) -> dict | None:
    """``options`` of a fixed-step ``--solver`` (its ``--step``); adaptive solvers take none."""
    return None if is_adaptive(args.solver) else {"step_size": args.step}


def run_once(problem, sens, device, measure: bool = False) -> dict:
    """One forward + backward. Returns the gradient, NFE, the guard's warning, the times and (with
    ``measure``) the memory kept for the backward."""
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if measure and device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            m0 = torch.cuda.memory_allocated(device)
            loss = problem.loss(sens)
            sync(device)
            out["kept_bytes"] = torch.cuda.memory_allocated(device) - m0
        elif measure:
            sb = measure_saved_bytes(lambda: problem.loss(sens), exclude=problem.exclude)
            loss, out["kept_bytes"] = sb.output, sb.total_bytes
        else:
            sync(device)
            t0 = time.perf_counter()
            loss = problem.loss(sens)
            sync(device)
            out["forward_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss, problem.inputs, allow_unused=True)
        sync(device)
        out["backward_s"] = time.perf_counter() - t1
        if measure and device.type == "cuda":
            out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - m0
    st = problem.stats
    out["grad"] = flat([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, problem.inputs)])
    out["loss"] = loss.item()
    out["nfe_forward"], out["nfe_backward"] = st.nfe_forward, st.nfe_backward
    out["steps_forward"], out["steps_backward"] = st.steps_forward, st.steps_backward
    out["backsolve_error"] = st.backsolve_error
    out["nodes"] = sorted(set(st.interpolation_nodes)) or None
    guard = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    out["warning"] = guard[0] if guard else None
    return out


def cmd_compare(args) -> dict:
    """``compare``: every method of ``--methods`` on the ``--model`` problem; returns the rows."""
    device, out_dir = setup_run(args)
    dtype = DTYPES[args.dtype]
    problem, desc = build_problem(args, device, dtype)
    methods = [parse_sensitivity(m) for m in args.methods]
    print(f"[compare] {desc}, {args.dtype}, device {device}")
    ref = run_once(problem, pob.Checkpointed(), device)["grad"]
    rows = []
    for label, sens in progress(methods, desc="methods", disable=args.no_progress):
        row = {"method": label}
        try:
            first = run_once(problem, sens, device, measure=True)
            times = [run_once(problem, sens, device) for _ in range(args.repeats)]
        except (pob.SolverError, ArithmeticError, RuntimeError) as e:
            row.update(status="failed", error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            continue
        row.update(
            status="ok", rel_err_vs_checkpointed=rel_l2(first["grad"], ref),
            nfe_forward=first["nfe_forward"], nfe_backward=first["nfe_backward"],
            steps_forward=first["steps_forward"], steps_backward=first["steps_backward"],
            time_iter_s=median([r["forward_s"] + r["backward_s"] for r in times]),
            time_forward_s=median([r["forward_s"] for r in times]),
            time_backward_s=median([r["backward_s"] for r in times]),
            kept_bytes=first["kept_bytes"], peak_bytes=first.get("peak_bytes"),
            backsolve_error=first["backsolve_error"], nodes=first["nodes"],
            guard_warning=first["warning"])
        rows.append(row)
    table_rows = [{
        "method": r["method"], "rel_err": fmt_sci(r.get("rel_err_vs_checkpointed")),
        "nfe f/b": f"{r['nfe_forward']}/{r['nfe_backward']}" if r["status"] == "ok" else "-",
        "s/iter": f"{r['time_iter_s']:.4f}" if r["status"] == "ok" else "-",
        "fwd/bwd s": f"{r['time_forward_s']:.4f}/{r['time_backward_s']:.4f}" if r["status"] == "ok" else "-",
        "kept": fmt_bytes(r.get("kept_bytes")),
        "note": (r.get("error") or ("guard warned" if r.get("guard_warning") else "")
                 + (f"nodes {r['nodes']}" if r.get("nodes") and "auto" in r["method"] else "")),
    } for r in rows]
    cols = ["method", "rel_err", "nfe f/b", "s/iter", "fwd/bwd s", "kept", "note"]
    if device.type == "cuda":
        for tr, r in zip(table_rows, rows):
            tr["peak"] = fmt_bytes(r.get("peak_bytes"))
        cols.insert(6, "peak")
    table = format_table(table_rows, cols, {"rel_err": "grad rel err vs checkpointed",
                                            "kept": "kept for backward"})
    print(table)
    name = f"compare_{args.model}"
    result = {"experiment": "compare", "model": args.model, "description": desc, "dtype": args.dtype,
              "device": str(device), "repeats": args.repeats, "rows": rows,
              "memory_measure": "cuda allocator" if device.type == "cuda" else "measure_saved_bytes"}
    write_json(out_dir / f"{name}.json", result)
    write_csv(out_dir / f"{name}.csv", rows)
    _plot_compare(rows, desc, out_dir / f"{name}.png")
    (out_dir / f"{name}.txt").write_text(desc + "\n" + table + "\n")
    return result


def _plot_compare(rows, title, path):
    pyplot = plt()
    ok = [r for r in rows if r["status"] == "ok"]
    labels = [r["method"] for r in ok]
    x = range(len(ok))
    fig, axes = pyplot.subplots(1, 4, figsize=(18, 4.2))
    raw = [r["rel_err_vs_checkpointed"] for r in ok]
    err, floor = zero_floor(raw)
    axes[0].bar(x, err, color="tab:red")
    axes[0].set_yscale("log")
    mark_zeros(axes[0], x, raw, floor)
    axes[0].set_title("gradient rel. error vs checkpointed")
    w = 0.4
    axes[1].bar([i - w / 2 for i in x], [r["nfe_forward"] for r in ok], w, label="forward")
    axes[1].bar([i + w / 2 for i in x], [r["nfe_backward"] for r in ok], w, label="backward")
    axes[1].set_title("function evaluations")
    axes[1].legend()
    axes[2].bar(x, [r["time_forward_s"] for r in ok], label="forward")
    axes[2].bar(x, [r["time_backward_s"] for r in ok], bottom=[r["time_forward_s"] for r in ok],
                label="backward")
    axes[2].set_title("time per iteration (s)")
    axes[2].legend()
    axes[3].bar(x, [r["kept_bytes"] / 2**20 for r in ok], color="tab:green")
    axes[3].set_title("memory kept for backward (MiB)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


# ----------------------------------------------------------------------------------------------
# ANODE: backsolve on a ReLU conv block with large weights


ANODE_METHODS = ["backprop", "checkpointed", "backsolve", "interpolated:16", "interpolating"]


def _anode_func(channels, scale, seed):
    torch.manual_seed(seed)
    func = ODEConvFunc(channels, weight_norm=False).double()
    with torch.no_grad():
        for p in func.parameters():
            p.mul_(scale)
    return func


def _anode_setting(name, args):
    if name == "rk4":
        # rtol/atol are odeint's defaults: the fixed step ignores them (so does the backsolve guard,
        # whose figure is an estimated relative gradient error).
        return f"rk4 h={args.step:g}", dict(method="rk4", options={"step_size": args.step}, rtol=1e-7, atol=1e-9)
    return f"dopri5 tol={args.tol:g}", dict(method="dopri5", options=None, rtol=args.tol, atol=args.tol)


def cmd_anode(args) -> dict:
    """``anode``: gradient errors of every method against checkpointed on a ReLU conv block with
    weights multiplied by each of ``--scales``, for each solver setting; returns rows and a summary."""
    device, out_dir = setup_run(args)
    torch.manual_seed(args.seed)
    y0_cpu = torch.randn(args.batch, args.channels, args.size, args.size, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    print(f"[anode] ODEConvFunc without weight norm ({args.channels} ch, ReLU), weights x scale, batch "
          f"{args.batch}x{args.channels}x{args.size}x{args.size}, float64, t in [0, 1], "
          f"loss = mean(z(1)^2), device {device}")
    rows = []
    jobs = [(s, sc) for s in args.settings for sc in args.scales]
    bar = progress(total=len(jobs) * (len(ANODE_METHODS) + 1), desc="anode", disable=args.no_progress)
    for setting, scale in jobs:
        label, kw = _anode_setting(setting, args)
        func = _anode_func(args.channels, scale, args.seed).to(device)
        grads = {}
        for spec in ANODE_METHODS:
            name, sens = parse_sensitivity(spec)
            problem = StateProblem(func, y0_cpu.clone().to(device), t, kw["method"], kw["rtol"], kw["options"])
            row = {"setting": label, "scale": scale, "method": name}
            t0 = time.perf_counter()
            try:
                r = run_once(problem, sens, device)
                grads[name] = r["grad"]
                row.update(status="ok", nfe_forward=r["nfe_forward"], nfe_backward=r["nfe_backward"],
                           backsolve_error=r["backsolve_error"], guard_warning=r["warning"])
            except (pob.SolverError, ArithmeticError, RuntimeError) as e:
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:400])
            row["time_s"] = time.perf_counter() - t0
            rows.append(row)
            bar.update()
        ref = grads.get("checkpointed")
        for row in rows:
            if row["setting"] == label and row["scale"] == scale and row["method"] in grads and ref is not None:
                g = grads[row["method"]]
                row["rel_err_vs_checkpointed"] = rel_l2(g, ref) if torch.isfinite(g).all() else float("inf")
                if "backprop" in grads:
                    row["rel_err_vs_backprop"] = rel_l2(g, grads["backprop"])
        # The guard's "raise" policy turns the warning into an error a training loop can catch.
        problem = StateProblem(func, y0_cpu.clone().to(device), t, kw["method"], kw["rtol"], kw["options"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_once(problem, pob.Backsolve(on_instability="raise"), device)
            raised = None
        except (pob.SolverError, ArithmeticError, RuntimeError) as e:
            raised = f"{type(e).__name__}: {e}"[:400]
        rows.append({"setting": label, "scale": scale, "method": "backsolve:raise",
                     "status": "raised" if raised else "ok", "error": raised})
        bar.update()
    bar.close()

    def note(r):
        if r.get("error"):
            return r["error"][:90]
        if r.get("guard_warning"):
            return "guard warned: " + r["guard_warning"][:70]
        return ""

    table_rows = [{"setting": r["setting"], "scale": r["scale"], "method": r["method"],
                   "rel_err": fmt_sci(r.get("rel_err_vs_checkpointed")),
                   "vs backprop": fmt_sci(r.get("rel_err_vs_backprop")),
                   "nfe f/b": f"{r['nfe_forward']}/{r['nfe_backward']}" if "nfe_forward" in r else "-",
                   "guard": fmt_sci(r.get("backsolve_error")), "note": note(r)} for r in rows]
    table = format_table(table_rows, ["setting", "scale", "method", "rel_err", "vs backprop", "nfe f/b",
                                      "guard", "note"],
                         {"rel_err": "rel err vs checkpointed", "guard": "backsolve est. rel err"})
    print(table)
    exact = [r["rel_err_vs_backprop"] for r in rows if r["method"] == "checkpointed" and "rel_err_vs_backprop" in r]
    bs = [r for r in rows if r["method"] == "backsolve"]
    summary = {
        "checkpointed_vs_backprop_max_rel_err": max(exact) if exact else None,
        "backsolve_max_rel_err": max((r.get("rel_err_vs_checkpointed", float("inf")) for r in bs), default=None),
        "backsolve_guard_warned": sum(bool(r.get("guard_warning")) for r in bs),
        "backsolve_failed": sum(r["status"] == "failed" for r in bs),
        "backsolve_runs": len(bs),
    }
    print(f"checkpointed vs backprop: max rel err {fmt_sci(summary['checkpointed_vs_backprop_max_rel_err'])}; "
          f"backsolve: max rel err {fmt_sci(summary['backsolve_max_rel_err'])}, guard warned in "
          f"{summary['backsolve_guard_warned']}/{len(bs)} runs, reverse solve failed in "
          f"{summary['backsolve_failed']}/{len(bs)}")
    result = {"experiment": "anode", "channels": args.channels, "batch": args.batch, "size": args.size,
              "rows": rows, "summary": summary}
    write_json(out_dir / "anode.json", result)
    write_csv(out_dir / "anode.csv", rows)
    (out_dir / "anode.txt").write_text(table + "\n")
    _plot_anode(rows, args, out_dir / "anode.png")
    return result


def _plot_anode(rows, args, path):
    pyplot = plt()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = pyplot.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        mine = [r for r in rows if r["setting"] == s and r["method"] in ANODE_METHODS]
        # One floor per panel for the exact zeros (checkpointed against itself, at least).
        _, floor = zero_floor([r["rel_err_vs_checkpointed"] for r in mine if "rel_err_vs_checkpointed" in r])
        for m in ANODE_METHODS:
            pts = [(r["scale"], r.get("rel_err_vs_checkpointed")) for r in mine if r["method"] == m]
            xs = [p[0] for p in pts if p[1] is not None]
            raw = [p[1] for p in pts if p[1] is not None]
            failed = [p[0] for p in pts if p[1] is None]
            line = ax.plot(xs, [min(floor if y == 0 else y, 1e30) for y in raw], "o-", label=m)[0] if xs else None
            if line is not None:
                mark_zeros(ax, xs, raw, floor, color=line.get_color())
            if failed:
                ax.plot(failed, [1e30] * len(failed), "x", ms=10, color=line.get_color() if line else "k",
                        label=f"{m} (reverse solve failed)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.margins(x=0.12)  # room for the "0 (exact)" labels at the outermost scales
        ax.set_xlabel("weight scale")
        ax.set_ylabel("gradient rel. error vs checkpointed")
        ax.set_title(f"ReLU conv ODE block, {s}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


# ----------------------------------------------------------------------------------------------
# IRDM Figure 2: interpolated gradient error vs nodes and tolerance on the cubic spiral


class Spiral(nn.Module):
    """``y' = net(y^3)``: the torchdiffeq demo's ODE function (``net`` 2-50-2 tanh), or
    ``y' = y^3 A^T`` with ``A`` the parameter (``kind="matrix"``)."""

    def __init__(self, kind: str, hidden: int = 50):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        else:
            self.A = nn.Parameter(torch.tensor(SPIRAL_A))

    def forward(self, t, y):
        y3 = y ** 3
        return self.net(y3) if self.kind == "mlp" else y3 @ self.A.T


def fit_spiral(func: Spiral, traj: torch.Tensor, A: torch.Tensor, steps: int, seed: int) -> float:
    """Fit ``func`` to the vector field ``A y^3`` around the true trajectory (regression on the
    field, no ODE solve: cheap, and leaves a small model error, as after training). Returns the
    final mean squared field error."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(func.parameters(), lr=1e-2)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        y = traj + 0.1 * torch.randn(traj.shape, generator=g, dtype=traj.dtype)
        loss = (func(0.0, y) - (y ** 3) @ A.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def cmd_fig2(args) -> dict:
    """``fig2``: relative l1 error of the interpolated gradient on the (tolerance x nodes) grid;
    returns the grid rows and backprop's own error at each tolerance."""
    device, out_dir = setup_run(args)
    dtype = torch.float64
    A = torch.tensor(SPIRAL_A, dtype=dtype)
    y0 = torch.tensor([[2.0, 0.0]], dtype=dtype)
    t = torch.linspace(0.0, args.T, args.outputs, dtype=dtype)
    with torch.no_grad():
        true = lambda tt, y: (y ** 3) @ A.T
        y_true = pob.odeint(true, y0, t, rtol=1e-12, atol=1e-12)
        fine = pob.odeint(true, y0, torch.linspace(0.0, args.T, 500, dtype=dtype), rtol=1e-10, atol=1e-10)[:, 0]
    torch.manual_seed(args.seed)
    func = Spiral(args.func).to(dtype)
    if args.func == "mlp":
        fit = fit_spiral(func, fine, A, args.fit_steps, args.seed)
    else:
        with torch.no_grad():  # away from the optimum, or the gradient is pure round-off
            func.A.mul_(1 + args.perturb * torch.randn(2, 2, dtype=dtype))
        fit = None
    func, y0, y_true, t = func.to(device), y0.to(device), y_true.to(device), t.to(device)

    def grad(sens, tol):
        st = pob.SolveStats()
        ys = pob.odeint(func, y0, t, rtol=tol, atol=tol, sensitivity=sens, stats=st)
        loss = (ys - y_true).abs().mean()
        g = torch.autograd.grad(loss, list(func.parameters()))
        return flat(g), st, loss.item()

    t0 = time.perf_counter()
    ref, st_ref, loss_ref = grad("backprop", args.ref_tol)
    print(f"[fig2] cubic spiral y' = A y^3, y0 = (2, 0), outputs at {args.outputs} times in [0, {args.T:g}], "
          f"func = {args.func}" + (f" (field fit mse {fit:.2e})" if fit is not None else "")
          + f", loss = mean |y - y_true| = {loss_ref:.4f}; ground truth: backprop at tol {args.ref_tol:g} "
          f"({st_ref.nfe_forward} NFE, {time.perf_counter() - t0:.1f} s)")
    rows = []
    grid = [(tol, n) for tol in args.tols for n in args.nodes]
    for tol, n in progress(grid, desc="fig2", disable=args.no_progress):
        g, st, _ = grad(pob.Interpolated(nodes=n), tol)
        rows.append({"tol": tol, "nodes": n, "rel_l1_err": rel_l1(g, ref), "rel_l2_err": rel_l2(g, ref),
                     "nfe_forward": st.nfe_forward, "nfe_backward": st.nfe_backward})
    floor = []
    for tol in args.tols:
        g, st, _ = grad("backprop", tol)
        floor.append({"tol": tol, "nodes": None, "method": "backprop", "rel_l1_err": rel_l1(g, ref),
                      "rel_l2_err": rel_l2(g, ref), "nfe_forward": st.nfe_forward, "nfe_backward": 0})
    table_rows = []
    for i, tol in enumerate(args.tols):
        tr = {"tol": f"{tol:g}"}
        for r in rows:
            if r["tol"] == tol:
                tr[f"N={r['nodes']}"] = fmt_sci(r["rel_l1_err"], 1)
        tr["backprop@tol"] = fmt_sci(floor[i]["rel_l1_err"], 1)
        table_rows.append(tr)
    cols = ["tol"] + [f"N={n}" for n in args.nodes] + ["backprop@tol"]
    table = format_table(table_rows, cols)
    print("relative l1 error of the interpolated gradient (rows: dopri5 tolerance, columns: Chebyshev nodes "
          "per output interval; last column: backprop at that tolerance, the solver's own error)")
    print(table)
    result = {"experiment": "fig2", "func": args.func, "T": args.T, "outputs": args.outputs,
              "ref_tol": args.ref_tol, "field_fit_mse": fit, "loss": loss_ref, "rows": rows,
              "backprop_at_tol": floor}
    write_json(out_dir / "fig2.json", result)
    write_csv(out_dir / "fig2.csv", rows + [dict(r) for r in floor])
    (out_dir / "fig2.txt").write_text(table + "\n")
    _plot_fig2(rows, floor, args, out_dir / "fig2.png")
    return result


def _plot_fig2(rows, backprop, args, path):
    import math

    pyplot = plt()
    fig, (ax0, ax1) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    err = {(r["tol"], r["nodes"]): r["rel_l1_err"] for r in rows}
    # Exact zeros (e.g. backprop at the reference tolerance) sit at one floor, labelled as such.
    _, floor = zero_floor(list(err.values()) + [b["rel_l1_err"] for b in backprop])
    mat = [[math.log10(err[tol, n] or floor) for n in args.nodes] for tol in args.tols]
    im = ax0.imshow(mat, cmap="viridis", aspect="auto")
    ax0.set_xticks(range(len(args.nodes)))
    ax0.set_xticklabels([str(n) for n in args.nodes])
    ax0.set_yticks(range(len(args.tols)))
    ax0.set_yticklabels([f"{t:g}" for t in args.tols])
    ax0.set_xlabel("Chebyshev nodes per output interval")
    ax0.set_ylabel("dopri5 tolerance")
    mid = 0.5 * (min(map(min, mat)) + max(map(max, mat)))
    for i, tol in enumerate(args.tols):
        for j, n in enumerate(args.nodes):
            v = mat[i][j]
            ax0.text(j, i, "0 (exact)" if err[tol, n] == 0 else f"{v:.1f}", ha="center", va="center",
                     color="k" if v > mid else "w", fontsize=8)
    fig.colorbar(im, ax=ax0, label="log10 relative l1 gradient error")
    ax0.set_title("IRDM gradient error (cf. IRDM Fig. 2)")
    for n in args.nodes:
        raw = [err[tol, n] for tol in args.tols]
        line = ax1.loglog(args.tols, [v or floor for v in raw], "o-", label=f"N={n}")[0]
        mark_zeros(ax1, args.tols, raw, floor, color=line.get_color())
    raw = [b["rel_l1_err"] for b in backprop]
    ax1.loglog(args.tols, [v or floor for v in raw], "k--", label="backprop at tol")
    mark_zeros(ax1, args.tols, raw, floor)
    ax1.invert_xaxis()
    ax1.set_xlabel("dopri5 tolerance")
    ax1.set_ylabel("relative l1 gradient error")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    ax1.set_title(f"cubic spiral, func={args.func}, ground truth backprop@{args.ref_tol:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


# ----------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_sensitivities.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{compare,anode,fig2,all}")

    c = sub.add_parser("compare", help="every gradient method on one model (default sub-command)")
    c.add_argument("--model", choices=["conv", "mlp", "cnf"], default="conv")
    c.add_argument("--batch", type=positive(int), default=16, help="batch size (default 16)")
    c.add_argument("--channels", type=positive(int), default=32, help="conv: state channels (default 32)")
    c.add_argument("--size", type=positive(int), default=16, help="conv: image height = width (default 16)")
    c.add_argument("--dim", type=positive(int), default=2, help="mlp: state dimension (default 2)")
    c.add_argument("--hidden", type=positive(int), default=64, help="mlp/cnf: hidden width (default 64)")
    c.add_argument("--data", choices=TOY_DATASETS, default="pinwheel", help="cnf: toy data set (default pinwheel)")
    c.add_argument("--solver", type=solver_arg, default="dopri5", help="ODE solver (default dopri5)")
    c.add_argument("--tol", type=positive(float), default=None,
                   help="adaptive solvers: rtol = atol (default 1e-3 conv, 1e-5 mlp/cnf)")
    c.add_argument("--step", type=positive(float), default=0.1,
                   help="fixed-step solvers (euler, midpoint, rk4, ...): step size (default 0.1)")
    c.add_argument("--outputs", type=positive(int, 2), default=2, metavar="K",
                   help="conv/mlp: output times in [0, 1], 2 or more (default 2)")
    c.add_argument("--methods", nargs="+", type=sensitivity_arg, default=DEFAULT_METHODS, metavar="SPEC",
                   help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}); {SENSITIVITY_HELP}")
    c.add_argument("--repeats", type=positive(int), default=3, help="timed iterations per method (median; default 3)")
    c.add_argument("--dtype", choices=list(DTYPES), default="float64",
                   help="float64 (default: round-off far below the methods' differences) or float32")
    add_run_args(c, SCRIPT)

    a = sub.add_parser("anode", help="ANODE: backsolve vs checkpointed on a ReLU conv block with large weights")
    a.add_argument("--channels", type=positive(int), default=8, help="state channels (default 8)")
    a.add_argument("--size", type=positive(int), default=8, help="image height = width (default 8)")
    a.add_argument("--batch", type=positive(int), default=4, help="batch size (default 4)")
    a.add_argument("--scales", type=positive(float), nargs="+", default=[1.0, 3.0, 10.0],
                   help="factors applied to the convolution weights and biases (default 1 3 10)")
    a.add_argument("--settings", nargs="+", choices=["rk4", "dopri5"], default=["rk4", "dopri5"],
                   help="solvers: fixed-step rk4 (--step) and adaptive dopri5 (--tol); default both")
    a.add_argument("--step", type=positive(float), default=0.1, help="rk4 step size (default 0.1)")
    a.add_argument("--tol", type=positive(float), default=1e-3, help="dopri5 rtol = atol (default 1e-3)")
    add_run_args(a, SCRIPT)

    f = sub.add_parser("fig2", help="IRDM Fig. 2: interpolated gradient error vs nodes and tolerance")
    f.add_argument("--func", choices=["mlp", "matrix"], default="mlp",
                   help="mlp: y' = net(y^3) fitted to A y^3 (default); matrix: y' = y^3 A^T with A "
                        "the parameter, perturbed by --perturb")
    f.add_argument("--nodes", type=positive(int), nargs="+", default=[4, 8, 16, 32, 64])
    f.add_argument("--tols", type=positive(float), nargs="+", default=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8])
    f.add_argument("--ref-tol", type=positive(float), default=1e-10,
                   help="tolerance of the ground truth (backprop)")
    f.add_argument("--T", type=positive(float), default=10.0, help="time horizon (default 10)")
    f.add_argument("--outputs", type=positive(int, 2), default=6, metavar="K",
                   help="output times in [0, T], 2 or more (the loss uses all; each interval gets its own grid)")
    f.add_argument("--fit-steps", type=positive(int), default=500, help="mlp: Adam steps fitting the field")
    f.add_argument("--perturb", type=float, default=0.05, help="matrix: relative perturbation of A")
    add_run_args(f, SCRIPT)

    al = sub.add_parser("all", help="compare (conv), anode and fig2 with their defaults")
    add_run_args(al, SCRIPT)
    # `compare` is the default: its options work without the sub-command, so --help shows them too.
    p.epilog = ("With no sub-command, the options are compare's: `compare_sensitivities.py --model mlp` "
                "runs `compare_sensitivities.py compare --model mlp`.\n\n" + c.format_help())
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options in ``argv`` (default ``sys.argv[1:]``); no sub-command means ``compare``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["compare"] + argv
    return _parser().parse_args(argv)


def main(argv=None) -> dict:
    """Run the sub-command in ``argv`` (default ``sys.argv[1:]``; no sub-command means ``compare``)
    and return its results (the dictionary written to JSON; ``all``: one per experiment)."""
    args = parse_args(argv)
    if args.command == "all":
        run = ["--seed", str(args.seed), "--device", args.device, "--out", args.out]
        run += ["--threads", str(args.threads)] if args.threads else []
        run += ["--no-progress"] if args.no_progress else []
        return {name: main([name] + run) for name in ("compare", "anode", "fig2")}
    return {"compare": cmd_compare, "anode": cmd_anode, "fig2": cmd_fig2}[args.command](args)


if __name__ == "__main__":
    main()
