"""Generate docs/api.md, the API reference, from the docstrings of the public names.

    python docs/gen_api.py            # rewrite docs/api.md
    python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date (used by the tests)
"""
from __future__ import annotations

import argparse
import inspect
import pathlib
import re
import sys

SECTIONS = [
    ("pyode_bridge", ["odeint", "odeint_adjoint", "odeint_event", "SolveStats", "SolverError",
                      "BackendUnavailableError", "ODEBlock"]),
    ("pyode_bridge (gradient methods)", ["Backprop", "Checkpointed", "Interpolated", "Interpolating",
                                         "Backsolve", "Sensitivity"]),
    ("pyode_bridge.torchdiffeq", ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense"]),
    ("pyode_bridge.solvers", ["ButcherTableau", "SolverConfig", "integrate", "rk_step", "DenseStep",
                              "DenseSolution", "PIController", "initial_step"]),
    ("pyode_bridge.nn", ["ODEBlock", "ConcatSquashLinear", "ConcatConv2d", "ODEConvFunc"]),
    ("pyode_bridge.models", ["build_model", "IRDMClassifier", "ODEResNet", "ODESqueezeNext", "CNF",
                             "memory_report", "predict_backward_bytes"]),
    ("pyode_bridge.data", ["sample_toy", "CIFAR", "read_cifar_pickle", "write_fake_cifar", "Digits"]),
]


def _module(section):
    import importlib

    name = section.split(" ")[0]
    return importlib.import_module(name)


def render() -> str:
    out = ["# API reference", "", "Generated from the docstrings by `python docs/gen_api.py`; do not edit.", ""]
    for section, names in SECTIONS:
        mod = _module(section)
        out += [f"## {section}", ""]
        for name in names:
            obj = getattr(mod, name)
            try:
                # A function as a default prints with its address: keep only its name (stable output).
                sig = re.sub(r"<function (\S+) at 0x[0-9a-f]+>", r"\1", str(inspect.signature(obj)))
            except (TypeError, ValueError):
                sig = ""
            kind = "class" if inspect.isclass(obj) else "def"
            out += [f"### `{kind} {name}{sig}`", "", inspect.getdoc(obj) or "(no docstring)", ""]
            if inspect.isclass(obj):
                for mname, member in inspect.getmembers(obj):
                    if mname.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                        continue
                    if mname not in vars(obj):
                        continue  # inherited
                    doc = inspect.getdoc(member)
                    if doc:
                        out += [f"- `{name}.{mname}`: " + doc.splitlines()[0]]
                out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    path = pathlib.Path(__file__).with_name("api.md")
    text = render()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print("docs/api.md is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
