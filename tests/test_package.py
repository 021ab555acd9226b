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
    none tests its class or compares its name, so a new method is taught in its own file only."""
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
            # `strategy.name == "checkpointed"` asks the same question by another route.
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                     for o in node.ops):
                sides = [node.left, *node.comparators]
                if (any(isinstance(n, ast.Attribute) and n.attr == "name" for n in sides)
                        and any(isinstance(n, ast.Constant) and n.value in SENSITIVITIES for n in sides)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


def test_no_import_cycle_among_the_package_modules():
    """Every import between pyode_bridge modules, at module level or inside a function, points one
    way: a cycle (odeint and events once imported each other) is found by a depth-first search."""
    import ast
    from pathlib import Path

    import pyode_bridge

    root = Path(pyode_bridge.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = ("pyode_bridge", *path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        tree = ast.parse(path.read_text())
        # Imports under `if TYPE_CHECKING:` never run: annotations may name each other's types.
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                module = node.module if not node.level else ".".join(filter(None, (base, node.module)))
                # `from . import nn` imports the submodule nn; `from .x import f` imports x.
                targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in files else module
                               for a in node.names)
        graph[name] = sorted(t for t in targets if t in files and t != name)
    assert "pyode_bridge.odeint" in graph["pyode_bridge"]  # the walk sees relative imports

    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
