"""The documentation stays true: the API reference is regenerated from the docstrings, and every
public name has a docstring."""
import inspect
import pathlib
import subprocess
import sys

import pyode_bridge as pob

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_api_reference_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


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
