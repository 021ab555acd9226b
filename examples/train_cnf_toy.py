"""Train FFJORD's continuous normalising flow on a 2-D toy density, and compare RDM with IRDM.

The model and settings are FFJORD's toy experiment as used by the IRDM paper (Daulbaev et al.,
2020, sec. 4.1, B.2): one CNF block of three concat-squash layers (hidden 64-64-64, tanh), exact
divergence, dopri5 at rtol = atol = 1e-5, integration time T = 0.5 (FFJORD's ``time_length``),
batches of 100 fresh samples, Adam with learning rate 1e-3 (weight decay 1e-5, FFJORD's default).
The paper trains for 10000 iterations (``--paper``); the default here is 200.

Single run (``--sensitivity``, default ``interpolated:16``): writes ``cnf_<data>.png`` (data,
learned density, samples), ``history.csv`` (test loss, NFE and training wall time at every
evaluation), ``results.json`` and ``model.pt`` (the flow's ``state_dict``, written atomically with a
checksum: read it with ``pyode_bridge.utils.load_checkpoint``).

Checkpoints (single runs): ``<out>/checkpoint.pt`` is written atomically every ``--ckpt-every``
iterations and at the end, with the flow, Adam's state, the counters, the history and every random
stream (the data stream's generator and torch's global generator, which draws the Hutchinson noise
of ``--divergence hutchinson`` and nothing else here). ``--resume`` continues from it: a run killed
and resumed ends with the same parameters and history as an uninterrupted run with the same seed
(bit for bit on the CPU with the same thread count; wall times aside). ``--iters`` may be raised to
train on from a finished run (with Hutchinson noise that continuation differs from a run started
with the larger ``--iters``: the evaluation at the old end drew noise). ``--stop-after-steps K``
simulates a kill after iteration ``K``. A damaged checkpoint is a one-line exit naming it ("corrupt
or truncated").

``--compare``: the IRDM paper's Table 1 / Figure 7 at small scale: RDM (``backsolve``) and IRDM
(``interpolated`` with each of ``--nodes``) trained from the same initialisation on the same data
stream (same seed); writes ``compare.png`` (test loss vs training wall time, total NFE vs
iteration), ``compare.csv`` / ``compare.json`` (time for the iterations, final test loss, total NFE)
and prints the table. A method whose training fails is reported as failed and the others go on.

Examples::

    python examples/train_cnf_toy.py --data pinwheel --sensitivity interpolated
    python examples/train_cnf_toy.py --data pinwheel --compare --iters 300
    python examples/train_cnf_toy.py --data moons --paper --device cuda
    python examples/train_cnf_toy.py --data moons --paper --device cuda --resume   # after a crash
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
from _common import (
    SENSITIVITY_HELP,
    Stopwatch,
    add_checkpoint_args,
    add_run_args,
    format_table,
    is_adaptive,
    load_resume_checkpoint,
    parse_sensitivity,
    plt,
    positive,
    progress,
    seed_everything,
    sensitivity_arg,
    setup_run,
    solver_arg,
    solver_label,
    write_csv,
    write_json,
)

import pyode_bridge as pob
from pyode_bridge.data import TOY_DATASETS, sample_toy
from pyode_bridge.models.cnf import CNF
from pyode_bridge.utils import atomic_save, capture_rng_state, restore_rng_state

SCRIPT = "train_cnf_toy"
CHECKPOINT = "checkpoint.pt"
FORMAT = "train_cnf_toy 1"
#: Options whose change makes a checkpoint meaningless for ``--resume`` (``--iters`` may grow).
_MUST_MATCH = ("data", "sensitivity", "batch", "lr", "weight_decay", "hidden", "T", "divergence", "solver", "tol",
               "step", "dtype", "test_size", "eval_every", "seed")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_flow(args, sens, device, dtype) -> CNF:
    """The FFJORD toy CNF with this run's settings; initialised from ``--seed`` so that every
    method of a comparison starts from the same parameters."""
    torch.manual_seed(args.seed)
    flow = CNF(2, hidden=tuple(args.hidden), T=args.T, divergence=args.divergence, sensitivity=sens,
               rtol=args.tol, atol=args.tol, method=args.solver,
               options=None if is_adaptive(args.solver) else {"step_size": args.step})
    return flow.to(device, dtype)


@torch.no_grad()
def test_loss(flow: CNF, x: torch.Tensor, chunk: int = 5000) -> float:
    """``-mean log p(x)`` in nats (no gradient; every method then runs the plain solve)."""
    total = 0.0
    for i in range(0, len(x), chunk):
        total += -flow.log_prob(x[i:i + chunk]).sum().item()
    return total / len(x)


def train(args, label: str, sens, device, dtype, bar=None, ckpt_path=None, resume=None) -> dict:
    """Train one flow for ``args.iters`` iterations.

    Args:
        ckpt_path: write the checkpoint there every ``args.ckpt_every`` iterations and at the end
            (``None``: no checkpoints).
        resume: a checkpoint of this function to continue from: the flow, Adam's state, the
            counters, the history and every random stream (the data stream's ``RandomState`` and
            torch's global generator, which draws the Hutchinson noise), so that the rest of the run
            is the uninterrupted run's, bit for bit.

    Returns:
        A dict with ``history`` (one row per evaluation: ``iter``, ``wall_s`` (training time so
        far, evaluations excluded), ``train_loss``, ``test_loss``, cumulative ``nfe_forward`` /
        ``nfe_backward``), the totals, the guard warnings of ``backsolve`` and ``flow``; on a failure
        ``status="failed"`` and ``error``; ``stopped`` when ``--stop-after-steps`` ended it.
    """
    seed_everything(args.seed)
    flow = build_flow(args, sens, device, dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # One generator for the data stream: every method sees the same batches.
    data_rng = np.random.RandomState(args.seed)
    x_test = sample_toy(args.data, args.test_size, seed=args.seed + 10_000, dtype=dtype, device=device)
    clock = Stopwatch(device)
    # Everything the loop accumulates, as one dictionary: it goes into the checkpoint as it is.
    state = {"iter": 0, "nfe_forward": 0, "nfe_backward": 0, "history": [], "running": [], "guard_warnings": 0,
             "first_guard_warning": None}
    status, error, stopped = "ok", None, False

    def evaluate(it):
        state["history"].append({"method": label, "iter": it, "wall_s": clock.total,
                             "train_loss": float(np.mean(state["running"])) if state["running"] else None,
                             "test_loss": test_loss(flow, x_test), "nfe_forward": state["nfe_forward"],
                             "nfe_backward": state["nfe_backward"]})
        state["running"].clear()

    def save():
        atomic_save({"format": FORMAT, "flow": flow.state_dict(), "optimizer": opt.state_dict(),
                     "train_time_s": clock.total, **state, "rng": capture_rng_state({"data": data_rng}),
                     "args": _args_dict(args)}, ckpt_path)

    if resume is None:
        evaluate(0)
    else:
        flow.load_state_dict(resume["flow"])
        opt.load_state_dict(resume["optimizer"])
        state.update({k: resume[k] for k in state})
        clock.total = resume["train_time_s"]
        restore_rng_state(resume["rng"], {"data": data_rng})  # last: building the flow drew from torch's
        if bar is not None:
            bar.update(state["iter"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for it in range(state["iter"] + 1, args.iters + 1):
            x = sample_toy(args.data, args.batch, seed=data_rng, dtype=dtype, device=device)
            clock.start()
            try:
                loss = -flow.log_prob(x).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            except (pob.SolverError, ArithmeticError, RuntimeError) as e:
                clock.stop()
                status, error = "failed", f"iteration {it}: {type(e).__name__}: {e}"[:400]
                break
            clock.stop()
            st = flow.stats
            state["iter"] = it
            state["nfe_forward"] += st.nfe_forward
            state["nfe_backward"] += st.nfe_backward
            state["running"].append(loss.item())
            if caught:
                state["guard_warnings"] += len(caught)
                state["first_guard_warning"] = state["first_guard_warning"] or str(caught[0].message)
                caught.clear()
            if it % args.eval_every == 0 or it == args.iters:
                evaluate(it)
            if bar is not None:
                bar.update()
                bar.set_postfix(method=label, loss=f"{loss.item():.3f}", nfe=f"{st.nfe_forward}/{st.nfe_backward}")
            if ckpt_path is not None and ((args.ckpt_every and it % args.ckpt_every == 0) or it == args.iters):
                save()
            if args.stop_after_steps is not None and it >= args.stop_after_steps:
                stopped = True
                break
    history = state["history"]
    if bar is not None and status != "ok":
        bar.update(args.iters - (history[-1]["iter"] if history else 0))
    final = history[-1]
    return {"method": label, "status": status, "error": error, "iters_done": final["iter"],
            "train_time_s": clock.total, "final_test_loss": final["test_loss"] if status == "ok" else None,
            "nfe_forward": state["nfe_forward"], "nfe_backward": state["nfe_backward"],
            "nfe_total": state["nfe_forward"] + state["nfe_backward"], "guard_warnings": state["guard_warnings"],
            "first_guard_warning": state["first_guard_warning"], "history": history, "flow": flow, "stopped": stopped}


@torch.no_grad()
def plot_flow(flow: CNF, args, device, dtype, path, label: str = "", iters: int = 0) -> None:
    """Three panels: training data, learned density ``exp log p`` on a grid, samples from the flow."""
    pyplot = plt()
    r, n = args.plot_range, args.grid
    xs = torch.linspace(-r, r, n, dtype=dtype, device=device)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    logp = torch.cat([flow.log_prob(pts[i:i + 5000]) for i in range(0, len(pts), 5000)])
    dens = logp.exp().reshape(n, n).cpu().numpy()
    g = torch.Generator(device=device).manual_seed(args.seed)
    samples = flow.sample(n=args.samples, generator=g).cpu().numpy()
    data = sample_toy(args.data, args.samples, seed=args.seed + 20_000).numpy()
    fig, axes = pyplot.subplots(1, 3, figsize=(13.5, 4.3), layout="constrained")
    axes[0].scatter(data[:, 0], data[:, 1], s=1.5, alpha=0.5)
    axes[0].set_title(f"data: {args.data} ({len(data)} samples)")
    im = axes[1].imshow(dens, extent=(-r, r, -r, r), origin="lower", cmap="viridis")
    fig.colorbar(im, ax=axes[1], shrink=0.85, label="p(x)")
    axes[1].set_title("learned density p(x)")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=1.5, alpha=0.5, color="tab:orange")
    axes[2].set_title(f"{len(samples)} samples from the flow")
    for ax in axes:
        ax.set_xlim(-r, r)
        ax.set_ylim(-r, r)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.set_aspect("equal")
    fig.suptitle(f"FFJORD CNF, {label}, {iters} iterations")
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def run_single(args, device, out_dir) -> dict:
    dtype = DTYPES[args.dtype]
    label, sens = parse_sensitivity(args.sensitivity)
    print(f"[train_cnf_toy] {args.data}, {label}, {args.iters} iterations, batch {args.batch}, "
          f"hidden {'-'.join(map(str, args.hidden))}, {solver_label(args.solver, args.tol, args.step)}, "
          f"device {device}")
    ckpt_path = out_dir / CHECKPOINT
    src, ck = load_resume_checkpoint(args, ckpt_path, FORMAT, _MUST_MATCH)
    if src is not None:
        print(f"resumed from {src}: iteration {ck['iter']}")
    bar = progress(total=args.iters, desc="train", disable=args.no_progress)
    res = train(args, label, sens, device, dtype, bar, ckpt_path=ckpt_path, resume=ck)
    bar.close()
    flow = res.pop("flow")
    if res["stopped"]:
        print(f"--stop-after-steps {args.stop_after_steps}: stopping at iteration {res['iters_done']} without a "
              "checkpoint (as if killed)")
        return {"mode": "single", "args": _args_dict(args), **res}
    write_csv(out_dir / "history.csv", res["history"])
    if res["status"] != "ok":
        print(f"training failed: {res['error']}")
    else:
        atomic_save(flow.state_dict(), out_dir / "model.pt")
        plot_flow(flow, args, device, dtype, out_dir / f"cnf_{args.data}.png", label, res["iters_done"])
    summary = {k: v for k, v in res.items() if k != "history"}
    print(format_table([{**summary, "final_test_loss": f"{summary['final_test_loss']:.4f}"
                         if summary["final_test_loss"] is not None else None,
                         "train_time_s": f"{summary['train_time_s']:.1f}"}],
                       ["method", "status", "iters_done", "train_time_s", "final_test_loss", "nfe_forward",
                        "nfe_backward", "guard_warnings"]))
    result = {"mode": "single", "args": _args_dict(args), **res}
    write_json(out_dir / "results.json", result)
    return result


def run_compare(args, device, out_dir) -> dict:
    dtype = DTYPES[args.dtype]
    specs = [args.baseline] + [f"interpolated:{n}" for n in args.nodes]
    methods = [parse_sensitivity(s) for s in specs]
    print(f"[train_cnf_toy --compare] {args.data}: {', '.join(m[0] for m in methods)}; {args.iters} iterations "
          f"each, {solver_label(args.solver, args.tol, args.step)}, same seed ({args.seed}) and data stream, "
          f"device {device}")
    bar = progress(total=args.iters * len(methods), desc="compare", disable=args.no_progress)
    runs = []
    for label, sens in methods:
        res = train(args, label, sens, device, dtype, bar)
        res.pop("flow")
        res.pop("stopped")
        runs.append(res)
    bar.close()
    rows = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    table_rows = [{"method": _paper_name(r["method"]),
                   "time_s": f"{r['train_time_s']:.1f}", "s/iter": f"{r['train_time_s'] / max(r['iters_done'], 1):.3f}",
                   "final test loss": f"{r['final_test_loss']:.5f}" if r["final_test_loss"] is not None else "-",
                   "NFE total": r["nfe_total"], "NFE f/b": f"{r['nfe_forward']}/{r['nfe_backward']}",
                   "guard warnings": r["guard_warnings"],
                   "status": r["status"] if r["status"] == "ok" else (r["error"] or "")[:80]} for r in runs]
    table = format_table(table_rows, ["method", "time_s", "s/iter", "final test loss", "NFE total", "NFE f/b",
                                      "guard warnings", "status"])
    print(f"time for {args.iters} training iterations (evaluations excluded), final test loss (nats), total NFE:")
    print(table)
    write_csv(out_dir / "compare.csv", rows)
    write_csv(out_dir / "compare_history.csv", [h for r in runs for h in r["history"]])
    (out_dir / "compare.txt").write_text(table + "\n")
    result = {"mode": "compare", "args": _args_dict(args), "runs": runs}
    write_json(out_dir / "compare.json", result)
    _plot_compare(runs, args, out_dir / "compare.png")
    return result


def _plot_compare(runs, args, path):
    pyplot = plt()
    from matplotlib.ticker import MaxNLocator
    fig, (ax0, ax1) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        h = r["history"]
        name = _paper_name(r["method"])
        if r["status"] != "ok":
            name += f" (failed after {r['iters_done']} iterations)"
        style = "k--" if r["method"].startswith("backsolve") else "-"
        ax0.plot([p["wall_s"] for p in h], [p["test_loss"] for p in h], style, marker=".", label=name)
        ax1.plot([p["iter"] for p in h], [p["nfe_forward"] + p["nfe_backward"] for p in h], style, marker=".",
                 label=name)
    ax0.set_xlabel("training wall time (s)")
    ax0.set_ylabel("test loss (nats)")
    ax0.set_title(f"{args.data}: test loss vs time (cf. IRDM Fig. 7)")
    ax1.set_xlabel("iteration")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional iterations on short runs
    ax1.set_ylabel("total NFE (forward + backward)")
    ax1.set_title("cumulative function evaluations (cf. IRDM Fig. 8)")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


def _paper_name(label: str) -> str:
    """The IRDM paper's name of a method label: RDM for backsolve, IRDM N=nodes for interpolated."""
    if label.startswith("backsolve"):
        return f"RDM ({label})"
    if label.startswith("interpolated:"):
        return f"IRDM N={label.split(':')[1]}"
    return label


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_cnf_toy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=TOY_DATASETS, default="pinwheel", help="toy density (default pinwheel)")
    p.add_argument("--sensitivity", type=sensitivity_arg, default="interpolated",
                   help=f"{SENSITIVITY_HELP} (default interpolated:16)")
    p.add_argument("--iters", type=positive(int), default=None,
                   help="training iterations (default 200; --paper: 10000)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's length: 10000 iterations, evaluation every 100")
    p.add_argument("--batch", type=positive(int), default=100, help="samples per iteration (default 100)")
    p.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay (default 1e-5)")
    p.add_argument("--hidden", type=positive(int), nargs="+", default=[64, 64, 64],
                   help="hidden widths (default 64 64 64)")
    p.add_argument("--T", type=positive(float), default=0.5, help="integration time (default 0.5)")
    p.add_argument("--divergence", choices=["exact", "hutchinson"], default="exact")
    p.add_argument("--solver", type=solver_arg, default="dopri5", help="ODE solver (default dopri5)")
    p.add_argument("--tol", type=positive(float), default=1e-5, help="adaptive solvers: rtol = atol (default 1e-5)")
    p.add_argument("--step", type=positive(float), default=0.05,
                   help="fixed-step solvers (euler, midpoint, rk4, ...): step size (default 0.05)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--test-size", type=positive(int), default=1000,
                   help="held-out samples for the test loss (default 1000)")
    p.add_argument("--eval-every", type=positive(int), default=None, help="iterations between test evaluations "
                                                                          "(default 50; --paper: 100)")
    p.add_argument("--grid", type=positive(int, 2), default=100, help="density plot resolution (default 100)")
    p.add_argument("--samples", type=positive(int), default=2000, help="samples to plot (default 2000)")
    p.add_argument("--plot-range", type=positive(float), default=4.0, help="plots cover [-R, R]^2 (default 4)")
    c = p.add_argument_group("comparison (IRDM Table 1 / Fig. 7)")
    c.add_argument("--compare", action="store_true", help="RDM vs IRDM with several node counts")
    c.add_argument("--nodes", type=positive(int), nargs="+", default=[4, 8, 16, 32, 64],
                   help="IRDM node counts (default 4 8 16 32 64)")
    c.add_argument("--baseline", type=sensitivity_arg, default="backsolve",
                   help="the RDM baseline spec (default backsolve; its guard's warnings are counted in "
                        "the table, not printed)")
    add_checkpoint_args(p, 100, "iterations", "at the end")
    add_run_args(p, SCRIPT)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options in ``argv`` (default ``sys.argv[1:]``)."""
    p = _parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare and (args.resume is not None or args.stop_after_steps is not None):
        p.error("--resume and --stop-after-steps apply to single runs; --compare writes no checkpoints")
    return args


def main(argv=None) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``), train (or compare), write the outputs and return
    the results dictionary."""
    args = parse_args(argv)
    if args.iters is None:
        args.iters = 10000 if args.paper else 200
    if args.eval_every is None:
        args.eval_every = 100 if args.paper else 50
    device, out_dir = setup_run(args)
    t0 = time.perf_counter()
    result = run_compare(args, device, out_dir) if args.compare else run_single(args, device, out_dir)
    print(f"outputs in {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return result


if __name__ == "__main__":
    main()
