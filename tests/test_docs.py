"""The documentation stays true: the API reference is rendered from the docstrings and covers every
public name, the site builds strictly, and every public name has a docstring."""
import importlib
import importlib.util
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import pyode_bridge as pob

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_api_reference_covers_the_public_names():
    """docs/api.md renders each public name from its docstring; a name added to ``__all__`` and left
    out of the reference fails here (the site build itself, with its broken-reference check, runs in
    .ci/run and in the test below)."""
    text = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)$", text, flags=re.M))
    objects = []
    for path in documented:  # every directive names something that exists
        mod, _, name = path.rpartition(".")
        objects.append(getattr(importlib.import_module(mod), name))
    missing = [n for n in pob.__all__ if callable(getattr(pob, n)) and not any(getattr(pob, n) is o for o in objects)]
    assert not missing, missing


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed")
def test_docs_site_builds_strictly(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_public_names_have_docstrings_with_shapes():
    for name in pob.__all__:
        obj = getattr(pob, name)
        if inspect.ismodule(obj) or name.startswith("__"):
            continue
        assert inspect.getdoc(obj), name
    for fn in (pob.odeint, pob.odeint_adjoint, pob.ODEBlock.forward):
        assert "shape" in inspect.getdoc(fn).lower() or "(T," in inspect.getdoc(fn), fn


def test_public_api_is_typed():
    sig = inspect.signature(pob.odeint)
    assert sig.return_annotation is not inspect.Signature.empty
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())
    assert (ROOT / "pyode_bridge" / "py.typed").exists()


def test_core_contracts_are_annotated():
    """The extension points (docs/extending.md) state their shapes in annotations: every parameter
    and the return of the solver, dense-output, gradient-method and memory contracts is annotated,
    in each built-in implementation too (mypy checks that the annotations hold)."""
    from pyode_bridge import memory, sensitivity, solvers
    from pyode_bridge._state import FlatRHS, StateSpec
    from pyode_bridge.sensitivity import _adjoint

    fns = [solvers.integrate, solvers.rk_step, solvers.SolverMethod.integrate, solvers.DenseStep.evaluate,
           FlatRHS.__init__, FlatRHS.__call__, FlatRHS.solving, _adjoint.record_forward, _adjoint.adjoint_sweep,
           memory.memory_report, memory.predict_backward_bytes, memory.measure_saved_bytes, memory.probe_func]
    steppers = (solvers.loop.RKStepper, solvers.AdamsStepper)  # the Stepper protocol and its two
    fns += [c.__init__ for c in steppers] + [getattr(c, n) for c in (solvers.Stepper, *steppers)
                                             for n in ("first_stage", "attempt", "accept", "finish")]
    fns += [getattr(StateSpec, n) for n in ("flatten", "unflatten", "flatten_time", "unflatten_time")]
    for cls in sensitivity.SENSITIVITIES.values():
        fns += [getattr(cls, n) for n in ("solve", "forward_pass", "backward_pass", "predict_backward_bytes")
                if hasattr(cls, n)]
        fns += [cls.__init__] if "__init__" in vars(cls) else []
    for fn in fns:
        sig = inspect.signature(fn)
        bare = [n for n, p in sig.parameters.items() if n != "self" and p.annotation is inspect.Parameter.empty]
        assert not bare, (fn.__qualname__, bare)
        if fn.__name__ != "__init__":
            assert sig.return_annotation is not inspect.Signature.empty, fn.__qualname__
