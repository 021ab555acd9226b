"""The package's own shape: what ``import pyode_bridge`` loads."""
import subprocess
import sys


def _loaded_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(m for m in sys.modules if m.startswith('pyode_bridge')))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_loads_the_solver_not_the_training_kit():
    mods = _loaded_after("import pyode_bridge")
    assert "pyode_bridge.odeint" in mods and "pyode_bridge.sensitivity" in mods
    assert not {m for m in mods if m.split(".")[1:2] in (["data"], ["models"], ["utils"])}, mods


def test_training_kit_loads_on_first_use():
    mods = _loaded_after("import pyode_bridge as pob\nassert callable(pob.models.build_model)\n"
                         "assert callable(pob.data.sample_toy)\nassert callable(pob.utils.atomic_save)")
    assert {"pyode_bridge.models", "pyode_bridge.data", "pyode_bridge.utils"} <= mods


def test_no_module_outside_sensitivity_asks_which_gradient_method_it_has():
    """``odeint``, the event search, the backends and the memory account read what a gradient
    method declares (``through_autograd``, ``solves_backward``, ``predict_backward_bytes``, ...):
    none tests its class, so a new method is taught in its own file only."""
    import ast
    from pathlib import Path

    import pyode_bridge
    from pyode_bridge.sensitivity import SENSITIVITIES

    classes = {cls.__name__ for cls in SENSITIVITIES.values()}
    root = Path(pyode_bridge.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "sensitivity":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                if names & classes:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
