"""The Julia package's declared requirements, checked against each other (no Julia needed).

julia/Project.toml ``[compat]`` is what Julia's resolver sees when PyodeBridge is developed;
julia/juliapkg.json is what juliapkg merges into the environment it installs; CUDA's requirement
lives in the Python loader (GPU support is opt-in, so it is not in juliapkg.json). They must say
the same thing, or a user gets a different environment from the one the bounds were chosen for.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers import read_toml

from pyode_bridge.backends.julia import _loader

REPO = Path(__file__).resolve().parents[1]




PROJECT = read_toml(REPO / "julia" / "Project.toml")
SPEC = json.loads((REPO / "julia" / "juliapkg.json").read_text())


def test_juliapkg_json_and_project_compat_agree():
    pkgs = SPEC["packages"]
    own = pkgs[PROJECT["name"]]
    assert own == {"uuid": PROJECT["uuid"], "path": ".", "dev": True}  # path relative to the json
    others = {k: v for k, v in pkgs.items() if k != PROJECT["name"]}
    # every hard dependency is pinned in juliapkg.json with exactly the Project.toml bound
    assert set(others) == set(PROJECT["deps"])
    for name, entry in others.items():
        assert entry["uuid"] == PROJECT["deps"][name], name
        assert entry["version"] == PROJECT["compat"][name], name
    assert SPEC["julia"] == "^" + PROJECT["compat"]["julia"]


def test_gpu_support_is_opt_in_and_matches_the_weak_dependency():
    """CUDA is a weak dependency only: not in juliapkg.json (which every CPU user installs), but
    in the loader's CUDA_PACKAGES with the Project.toml uuid and bound."""
    assert not set(_loader.CUDA_PACKAGES) & set(SPEC["packages"])
    assert set(_loader.CUDA_PACKAGES) == set(PROJECT["weakdeps"])
    for name, (uuid, compat) in _loader.CUDA_PACKAGES.items():
        assert PROJECT["weakdeps"][name] == uuid
        assert PROJECT["compat"][name] == compat
    assert PROJECT["extensions"] == {"PyodeBridgeCUDAExt": "CUDA"}
    assert (REPO / "julia" / "ext" / "PyodeBridgeCUDAExt.jl").is_file()


def _version(text: str) -> tuple:
    return tuple(int(x) for x in re.match(r"[\^~=]?(\d+)\.(\d+)\.(\d+)", text).groups())


def test_minimum_julia_is_juliacall_s_minimum():
    assert _version(SPEC["julia"]) == _loader.MIN_JULIA
    spec = importlib.util.find_spec("juliacall")
    if spec is None or spec.origin is None:
        pytest.skip("juliacall is not installed, so its own minimum cannot be read")
    theirs = json.loads((Path(spec.origin).parent / "juliapkg.json").read_text())["julia"]
    assert _version(theirs) == _loader.MIN_JULIA, (
        f"juliacall now requires Julia {theirs}; update MIN_JULIA, Project.toml and juliapkg.json")


def test_api_version_matches():
    src = (REPO / "julia" / "src" / "PyodeBridge.jl").read_text()
    assert f"const API_VERSION = {_loader.API_VERSION}" in src


def test_every_bound_is_a_plain_julia_compat_entry():
    """juliapkg and Pkg both parse these: numbers, ', '-separated (no ranges, no operators
    that the two would read differently)."""
    for name, compat in PROJECT["compat"].items():
        assert re.fullmatch(r"\d+(\.\d+){0,2}(, \d+(\.\d+){0,2})*", compat), (name, compat)


def test_diffeqpy_is_an_optional_extra_only():
    project = read_toml(REPO / "pyproject.toml")["project"]
    assert not any(dep.startswith("diffeqpy") for dep in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(dep.startswith("diffeqpy") for dep in extras["diffeqpy"])
    assert any(dep.startswith("juliacall") for dep in extras["julia"])


def test_package_data_ships_every_julia_file():
    data = read_toml(REPO / "pyproject.toml")["tool"]["setuptools"]["package-data"]["pyode_bridge_julia"]
    shipped = set()
    for pattern in data:
        shipped |= {p.relative_to(REPO / "julia").as_posix() for p in (REPO / "julia").glob(pattern)}
    on_disk = {p.relative_to(REPO / "julia").as_posix() for p in (REPO / "julia").rglob("*")
               if p.is_file() and p.suffix in (".jl", ".toml", ".json")}
    assert on_disk <= shipped, sorted(on_disk - shipped)


def test_ci_workflow_runs_the_julia_side():
    """The workflow a maintainer with Julia runs first: it must install the package, run
    julia/test/runtests.jl and the julia- and cuda-marked tests."""
    text = (REPO / ".github" / "workflows" / "julia.yml").read_text()
    assert "julia/test/runtests.jl" in text
    assert "-m julia" in text and "cuda" in text
    assert "pip install" in text and "PYODE_BRIDGE_JULIA_CUDA" in text
