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
