"""Helpers shared by the example scripts: command-line options every script has, seeding, devices,
progress bars, tables, JSON/CSV output and the ``--sensitivity`` spec syntax.

The scripts import this module as ``_common`` (Python puts a script's own folder first on
``sys.path``; the tests add ``examples/`` themselves).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyode_bridge as pob
from pyode_bridge.utils import CheckpointError, load_checkpoint

__all__ = ["add_run_args", "setup_run", "resolve_device", "seed_everything", "progress", "sync",
           "Stopwatch", "format_table", "write_json", "write_csv", "parse_sensitivity",
           "SENSITIVITY_HELP", "plt", "median", "fmt_bytes", "fmt_sci", "sensitivity_arg", "solver_arg",
           "solver_label", "is_adaptive", "positive", "zero_floor", "mark_zeros", "add_checkpoint_args",
           "load_resume_checkpoint"]


def plt():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the scripts only write PNG files,
    and must run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def add_run_args(parser: argparse.ArgumentParser, script: str) -> None:
    """The options every example has: ``--seed``, ``--device``, ``--out``, ``--threads``,
    ``--no-progress``."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of every random stream (default 0)")
    g.add_argument("--device", default="auto",
                   help="'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when available; default)")
    g.add_argument("--out", default=os.path.join("outputs", script),
                   help=f"folder for plots, tables and checkpoints (default outputs/{script})")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is best for tiny problems "
                        "on a shared machine)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def add_checkpoint_args(parser: argparse.ArgumentParser, every: int, unit: str, also: str):
    """``--ckpt-every`` (default ``every``), ``--resume [PATH]`` and ``--stop-after-steps K`` of the
    training scripts, in a "checkpoints" group (returned, for a script's own additions).

    Args:
        unit: what one step is, for the help ("optimiser steps", "iterations").
        also: when the script writes the checkpoint anyway ("after every epoch", "at the end").
    """
    c = parser.add_argument_group("checkpoints")
    c.add_argument("--ckpt-every", type=int, default=every,
                   help=f"write the checkpoint every N {unit} (and {also}; 0: {also} only; default {every})")
    c.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH, or (no PATH) from <out>/checkpoint.pt if it exists")
    c.add_argument("--stop-after-steps", type=int, default=None, metavar="K",
                   help="simulate a crash: stop right after step K without writing anything")
    return c


def load_resume_checkpoint(args, default: Path, fmt, must_match) -> tuple:
    """The checkpoint that ``--resume`` names, verified and checked against this run.

    Args:
        args: the parsed options (``args.resume``: ``None``, ``"auto"`` or a path).
        default: the checkpoint ``--resume`` without a path means (``<out>/checkpoint.pt``).
        fmt: the ``"format"`` entry the script writes; another one is another script's checkpoint.
        must_match: option names whose values must equal the checkpoint's (``args`` entry).

    Returns:
        ``(path, checkpoint dict)``, or ``(None, None)`` when not resuming (no ``--resume``, or
        ``--resume`` without a path and nothing at ``default`` yet: a fresh start, said in one line).

    Raises:
        SystemExit: one line, no traceback: a missing ``PATH``, a damaged file (corrupt or
            truncated), another script's checkpoint, or different settings (each one named).
    """
    if args.resume is None:
        return None, None
    path = default if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        if args.resume == "auto":
            print(f"--resume: no checkpoint at {path}; starting from scratch")
            return None, None
        raise SystemExit(f"--resume {path}: no such checkpoint")
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:  # damaged: say so in one line (a traceback would add nothing)
        raise SystemExit(f"--resume: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        found = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise SystemExit(f"--resume: {path} is not a checkpoint of this script (format {found})")
    saved = ck.get("args", {})
    diff = [k for k in must_match if saved.get(k) != getattr(args, k)]
    if diff:
        raise SystemExit("--resume: the checkpoint was written with different settings: " + ", ".join(
            f"{k}={saved.get(k)!r} (now {getattr(args, k)!r})" for k in diff))
    return path, ck


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as ``torch.device``.

    Raises:
        SystemExit: CUDA was asked for but torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}); use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global state and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_run(args) -> tuple:
    """Apply ``--threads`` and ``--seed``, create ``--out``, pick the device.

    Returns:
        ``(device, out_folder)``.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return resolve_device(args.device), out


def progress(iterable=None, *, disable: bool = False, **kwargs):
    """A tqdm progress bar on stderr (a plain pass-through when tqdm is missing or ``disable``)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency of the examples
        disable = True
    if disable:
        class _Quiet:
            def __init__(self, it):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def update(self, n=1):
                pass

            def set_postfix(self, *a, **k):
                pass

            def set_description(self, *a, **k):
                pass

            def close(self):
                pass

            def write(self, s):
                print(s)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return _Quiet(iterable if iterable is not None else ())
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)


def sync(device) -> None:
    """Wait for queued CUDA work (timings of asynchronous kernels are otherwise meaningless)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates wall time between :meth:`start` and :meth:`stop`, synchronising CUDA."""

    def __init__(self, device="cpu"):
        self.device, self.total, self._t0 = device, 0.0, None

    def start(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        sync(self.device)
        dt = time.perf_counter() - self._t0
        self.total += dt
        self._t0 = None
        return dt


def median(xs):
    """Median of a non-empty sequence of numbers."""
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def fmt_sci(x, digits: int = 2) -> str:
    """``1.23e-04`` style; ``-`` for ``None``; ``nan``/``inf`` as such."""
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.{digits}e}"


def fmt_bytes(n) -> str:
    """Bytes in B / KiB / MiB / GiB."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def zero_floor(values) -> tuple:
    """Values for a log axis, where an exact zero has no place: zeros are drawn at a floor a decade
    below the smallest positive value (1e-17 if there is none; label them with :func:`mark_zeros`).

    Returns:
        ``(values with zeros replaced by the floor, the floor)``.
    """
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    floor = min(pos) / 10 if pos else 1e-17
    return [floor if v == 0 else v for v in values], floor


def mark_zeros(ax, xs, values, floor, **kw) -> None:
    """Write "0 (exact)" at each ``x`` whose value is exactly zero (drawn at ``floor`` on a log axis)."""
    for x, v in zip(xs, values):
        if v == 0:
            ax.annotate("0 (exact)", (x, floor), textcoords="offset points", xytext=(0, 4), ha="center",
                        va="bottom", fontsize=kw.get("fontsize", 7), color=kw.get("color", "k"))


def format_table(rows: list, columns: list, headers: dict | None = None) -> str:
    """A plain-text table of ``rows`` (dicts) with the given ``columns`` (keys); cells are
    ``str(value)`` unless already strings; missing keys print ``-``."""
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    body = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(b) for b in body])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)  # JSON has no NaN/Infinity
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON (tensors as lists, NaN/inf as strings)."""
    path = Path(path)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def write_csv(path, rows: list, columns: list | None = None) -> Path:
    """Write a list of dicts as CSV (columns: the given ones, else the union in first-seen order)."""
    path = Path(path)
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _jsonable(r.get(k)) for k in columns})
    return path


SENSITIVITY_HELP = (
    "gradient method spec: backprop | checkpointed[:EVERY] | interpolated[:NODES|:auto] | "
    "interpolating[:ckpt] | backsolve[:warn|:raise|:ignore]")


def parse_sensitivity(spec: str) -> tuple:
    """A gradient method from a short spec, for command lines.

    ``backprop``, ``checkpointed`` / ``checkpointed:4`` (a checkpoint every 4 steps),
    ``interpolated`` (16 nodes) / ``interpolated:8`` / ``interpolated:auto``, ``interpolating`` /
    ``interpolating:ckpt`` (re-solve between sqrt(Nt) checkpoints), ``backsolve`` /
    ``backsolve:raise`` / ``backsolve:ignore`` (instability guard policy; default ``warn``).

    Returns:
        ``(label, Sensitivity)``; the label is the spec as written (``interpolated`` ->
        ``interpolated:16``).

    Raises:
        argparse.ArgumentTypeError: an unknown name or option (usable as an argparse ``type``).
    """
    name, _, opt = spec.strip().partition(":")

    def count(what):
        if not opt.isdigit() or int(opt) < 1:
            raise argparse.ArgumentTypeError(f"bad gradient method {spec!r}: {name}:{what} takes a positive "
                                             f"integer, got {opt!r}")
        return int(opt)

    try:
        if name == "backprop" and not opt:
            return "backprop", pob.Backprop()
        if name == "checkpointed":
            every = count("EVERY") if opt else 1
            return (f"checkpointed:{every}" if every != 1 else "checkpointed"), pob.Checkpointed(every=every)
        if name == "interpolated":
            nodes = "auto" if opt == "auto" else (count("NODES") if opt else 16)
            return f"interpolated:{nodes}", pob.Interpolated(nodes=nodes)
        if name == "interpolating" and opt in ("", "ckpt"):
            return (spec.strip(), pob.Interpolating(checkpointing=opt == "ckpt"))
        if name == "backsolve" and opt in ("", "warn", "raise", "ignore"):
            policy = opt or "warn"
            return ("backsolve" if policy == "warn" else f"backsolve:{policy}"), \
                pob.Backsolve(on_instability=policy)
    except ValueError as e:  # the library's own check of the option
        raise argparse.ArgumentTypeError(f"bad gradient method {spec!r}: {e}") from None
    raise argparse.ArgumentTypeError(f"unknown gradient method {spec!r}; {SENSITIVITY_HELP}")


def sensitivity_arg(spec: str) -> str:
    """argparse ``type=`` for a gradient method spec: its canonical label (``interpolated`` ->
    ``interpolated:16``), or a one-line usage error for an unknown spec."""
    return parse_sensitivity(spec)[0]


def is_adaptive(method: str) -> bool:
    """Whether ``method`` (a name in ``pob.TABLEAUX``) has error control (else: fixed steps)."""
    return pob.TABLEAUX[method].adaptive


def solver_arg(name: str) -> str:
    """argparse ``type=`` for an ODE solver name: one of ``pob.TABLEAUX``, else a one-line usage
    error listing them."""
    if name not in pob.TABLEAUX:
        adaptive = [m for m in pob.TABLEAUX if is_adaptive(m)]
        fixed = [m for m in pob.TABLEAUX if not is_adaptive(m)]
        raise argparse.ArgumentTypeError(f"unknown solver {name!r}; adaptive: {', '.join(adaptive)}; "
                                         f"fixed-step: {', '.join(fixed)}")
    return name


def solver_label(method: str, tol: float, step: float | None = None) -> str:
    """``dopri5 tol 1e-05`` for an adaptive solver, ``rk4 step 0.1`` for a fixed-step one (which has
    no tolerance to report)."""
    if is_adaptive(method):
        return f"{method} tol {tol:g}"
    return f"{method} step {step:g}" if step is not None else f"{method} (steps on the output times)"


def positive(kind, minimum=None):
    """argparse ``type=``: a positive ``int`` or ``float``, or one ``>= minimum`` (a one-line usage
    error otherwise)."""
    want = f"a positive {kind.__name__}" if minimum is None else \
        f"{'an int' if kind is int else 'a float'} >= {minimum}"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not (value > 0 if minimum is None else value >= minimum):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert
