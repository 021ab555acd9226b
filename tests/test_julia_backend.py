"""Tests of ``backend="julia"`` (pyode_bridge.backends.julia and the Julia package in julia/).

Run everywhere (no Julia needed, nothing of Julia is mocked):

- the unavailable-Julia path: fast, clear, carrying the cause, never solving with torch instead;
  exercised with no Julia at all, with broken/hanging/too-old executables (small shell scripts
  standing in for a bad ``julia`` on PATH), without juliacall, and with downloads allowed but the
  network unreachable;
- ``import pyode_bridge`` does not import juliacall;
- the pure-Python pieces: parameter flattening, option and sensitivity mapping, tensor hand-off,
  and the torch callbacks that Julia calls (with NumPy arrays in place of the Julia buffers,
  which is what they are on the Python side).

Run only where Julia can be had (marked ``julia``; skipped with the reason otherwise): the julia
backend's solutions and gradients against the torch backend's for every method and gradient
method, and julia/test/runtests.jl.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import read_toml
from torch import nn

import pyode_bridge as pob
from pyode_bridge._state import StateSpec
from pyode_bridge._validate import make_config
from pyode_bridge.backends.julia import _loader
from pyode_bridge.backends.julia._handoff import (
    CudaCarrier,
    cuda_interface,
    julia_view,
    matrix_from_julia,
    matrix_to_julia,
    vector_to_julia,
    write,
)
from pyode_bridge.backends.julia._options import (
    METHODS,
    SENSITIVITY_KINDS,
    TORCH_ONLY_METHODS,
    JuliaSensitivity,
    julia_method,
    resolve_sensitivity,
    solver_kwargs,
)
from pyode_bridge.backends.julia._rhs import FlatParams, TorchRHS

REPO = Path(__file__).resolve().parents[1]
_SLEEP = shutil.which("sleep") or "/bin/sleep"  # found before the tests empty PATH
POSIX = pytest.mark.skipif(os.name == "nt", reason="uses POSIX shell scripts as fake executables")
JULIACALL = _loader._juliacall_installed()
_JULIA_VARS = ("PYTHON_JULIACALL_EXE", "PYTHON_JULIACALL_PROJECT", "PYTHON_JULIACALL_BINDIR",
               "PYTHON_JULIAPKG_EXE", "PYTHON_JULIAPKG_PROJECT", "PYTHON_JULIAPKG_OFFLINE",
               "JULIA_DEPOT_PATH", "CONDA_PREFIX", _loader.DOWNLOAD_ENV)


def _julia_running() -> bool:
    jc = sys.modules.get("juliacall")
    return _loader._STATE["bridge"] is not None or (
        jc is not None and getattr(jc, "CONFIG", {}).get("inited", False))


@pytest.fixture
def probe_only(monkeypatch):
    """The executable probes run after the juliacall check; pass that check so they are reached
    whether or not juliacall is installed here."""
    monkeypatch.setattr(_loader, "_juliacall_installed", lambda: True)


@pytest.fixture
def no_julia(monkeypatch, tmp_path):
    """An environment in which no Julia can be found: empty PATH dir, no Julia variables."""
    if _julia_running():
        pytest.skip("Julia is already running in this process, so the unavailable path cannot "
                    "be exercised here")
    for var in _JULIA_VARS:
        monkeypatch.delenv(var, raising=False)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PYTHON_JULIAPKG_PROJECT", str(tmp_path / "julia_env"))
    return bindir


def _fake_exe(bindir: Path, name: str, body: str) -> Path:
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _problem(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    y0 = torch.tensor([0.5, -0.3], dtype=dtype, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=dtype)
    return net, y0, t


class Field(nn.Module):
    """A small time-dependent vector field: f(t, y) = tanh(W y + b) * (1 + t)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(torch.randn(3, 3, generator=g, dtype=dtype) * 0.5)
        self.b = nn.Parameter(torch.randn(3, generator=g, dtype=dtype) * 0.1)

    def forward(self, t, y):
        return torch.tanh(self.W @ y + self.b) * (1 + t)


# ----------------------------------------------------------------------------------------------
# Import laziness
# ----------------------------------------------------------------------------------------------

def test_import_does_not_start_julia():
    code = textwrap.dedent("""
        import sys
        import pyode_bridge, pyode_bridge.backends, pyode_bridge.backends.julia
        bad = [m for m in ("juliacall", "juliapkg") if m in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------
# Julia unavailable: fast, clear, no fallback
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sensitivity", ["gauss", "backsolve", "interpolating", "quadrature"])
def test_unavailable_is_fast_clear_and_never_falls_back(no_julia, sensitivity):
    net, y0, t = _problem()
    calls = []

    def func(tt, y):
        calls.append(float(tt))
        return net(y)

    start = time.perf_counter()
    with pytest.raises(pob.BackendUnavailableError) as info:
        pob.odeint(func, y0, t, backend="julia", sensitivity=sensitivity)
    elapsed = time.perf_counter() - start
    err = info.value
    assert isinstance(err, RuntimeError)
    assert elapsed < 2.0, f"the unavailable path took {elapsed:.2f} s"
    assert calls == [], "the right-hand side was evaluated: something solved without Julia"
    msg = str(err)
    if JULIACALL:
        assert isinstance(err.__cause__, FileNotFoundError)
        assert "no Julia was found" in msg
    else:
        assert isinstance(err.__cause__, ModuleNotFoundError)
    for fix in ("PYTHON_JULIACALL_EXE", _loader.DOWNLOAD_ENV, 'backend="torch"'):
        assert fix in msg
    assert "juliacall" not in sys.modules or not _julia_running()


def test_unavailable_again_is_as_fast(no_julia):
    net, y0, t = _problem()
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(pob.BackendUnavailableError):
            pob.odeint(lambda tt, y: net(y), y0, t, backend="julia", sensitivity="gauss")
        assert time.perf_counter() - start < 2.0


def test_missing_juliacall_names_the_extra(no_julia, monkeypatch):
    monkeypatch.setitem(sys.modules, "juliacall", None)  # makes `import juliacall` fail
    net, y0, t = _problem()
    with pytest.raises(pob.BackendUnavailableError) as info:
        pob.odeint(lambda tt, y: net(y), y0, t, backend="julia", sensitivity="gauss")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert "pip install 'pyode-bridge[julia]'" in str(info.value)


def test_explicit_executable_that_does_not_exist(no_julia, probe_only, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHON_JULIACALL_EXE", str(tmp_path / "nowhere" / "julia"))
    with pytest.raises(pob.BackendUnavailableError) as info:
        _loader.preflight()
    assert "PYTHON_JULIACALL_EXE=" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@POSIX
def test_broken_julia_on_path(no_julia, probe_only):
    _fake_exe(no_julia, "julia", 'echo "this is not julia"; exit 3')
    with pytest.raises(pob.BackendUnavailableError) as info:
        _loader.preflight()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "not a working Julia" in str(info.value)


@POSIX
def test_hanging_julia_is_cut_off(no_julia, probe_only, monkeypatch):
    _fake_exe(no_julia, "julia", f"{_SLEEP} 30")  # sh waits on a child: the group is killed
    monkeypatch.setattr(_loader, "PROBE_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(pob.BackendUnavailableError) as info:
        _loader.preflight()
    assert time.perf_counter() - start < 5.0
    assert isinstance(info.value.__cause__, TimeoutError)


@POSIX
@pytest.mark.parametrize("version", ["1.6.7", "1.10.2"])
def test_too_old_julia(no_julia, probe_only, version):
    """juliacall's own minimum is 1.10.3: anything older is refused before Julia starts."""
    _fake_exe(no_julia, "julia", f'echo "julia version {version}"')
    with pytest.raises(pob.BackendUnavailableError) as info:
        _loader.preflight()
    assert "too old" in str(info.value)
    assert version in str(info.value.__cause__)


@POSIX
def test_oldest_supported_julia_is_accepted(no_julia, probe_only):
    exe = _fake_exe(no_julia, "julia", 'echo "julia version 1.10.3"')
    found = _loader.preflight()
    assert found.exe == str(exe) and found.version == (1, 10, 3)


@POSIX
def test_working_probe_reads_the_version(no_julia, probe_only):
    exe = _fake_exe(no_julia, "julia", 'echo "julia version 1.11.2"')
    assert _loader.probe_version(str(exe), timeout=10) == (1, 11, 2)
    found = _loader.preflight()
    assert found.exe == str(exe) and "PATH" in found.source


@POSIX
def test_where_julia_is_looked_for_first(no_julia, monkeypatch, tmp_path):
    on_path = _fake_exe(no_julia, "julia", 'echo "julia version 1.11.2"')
    other = tmp_path / "other"
    other.mkdir()
    pkg_exe = _fake_exe(other, "julia-pkg", 'echo "julia version 1.10.5"')
    call_exe = _fake_exe(other, "julia-call", 'echo "julia version 1.12.0"')
    assert _loader.locate_julia()[0].exe == str(on_path)
    monkeypatch.setenv("PYTHON_JULIAPKG_EXE", str(pkg_exe))
    assert _loader.locate_julia()[0].exe == str(pkg_exe)
    monkeypatch.setenv("PYTHON_JULIACALL_EXE", str(call_exe))
    assert _loader.locate_julia()[0].exe == str(call_exe)
    monkeypatch.delenv("PYTHON_JULIACALL_EXE")
    monkeypatch.delenv("PYTHON_JULIAPKG_EXE")
    on_path.unlink()
    _fake_exe(no_julia, "juliaup", "exit 0")
    found, _ = _loader.locate_julia()
    assert found.exe is None and "juliaup" in found.source


def test_download_needs_consent(monkeypatch):
    env = {}
    assert not _loader.download_allowed(env)
    env[_loader.DOWNLOAD_ENV] = "yes"
    assert _loader.download_allowed(env)
    env["PYTHON_JULIAPKG_OFFLINE"] = "yes"
    assert not _loader.download_allowed(env)


def test_environment_single_thread_and_signals():
    env = {}
    _loader.configure_environment(env)
    assert env == {"PYTHON_JULIACALL_THREADS": "1"}
    env = {"PYTHON_JULIACALL_THREADS": "4"}
    _loader.configure_environment(env)
    assert env["PYTHON_JULIACALL_HANDLE_SIGNALS"] == "yes"
    env = {"PYTHON_JULIACALL_THREADS": "4", "PYTHON_JULIACALL_HANDLE_SIGNALS": "no"}
    _loader.configure_environment(env)
    assert env["PYTHON_JULIACALL_HANDLE_SIGNALS"] == "no"  # the user's choice stands


def test_download_allowed_but_unreachable_fails_fast(tmp_path):
    """With consent, juliapkg tries to download Julia; an unreachable network (a proxy on a
    closed port) must give BackendUnavailableError quickly, carrying the network error."""
    if os.name == "nt":
        pytest.skip("POSIX-only environment set-up")
    if not JULIACALL:
        pytest.skip("needs juliacall (pip install 'pyode-bridge[julia]'): juliapkg does the download")
    env = {k: v for k, v in os.environ.items()
           if k not in _JULIA_VARS and k.lower() not in ("no_proxy", "all_proxy")}
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env.update({
        "PATH": str(bindir), "HOME": str(tmp_path), _loader.DOWNLOAD_ENV: "yes",
        "PYTHON_JULIAPKG_PROJECT": str(tmp_path / "julia_env"),
        "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
    })
    code = textwrap.dedent("""
        import time, torch, pyode_bridge as pob
        start = time.perf_counter()
        try:
            pob.odeint(lambda t, y: -y, torch.ones(2), torch.linspace(0, 1, 3),
                       backend="julia", sensitivity="gauss")
        except pob.BackendUnavailableError as e:
            print("RESULT", type(e.__cause__).__name__, round(time.perf_counter() - start, 3))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env, cwd=str(tmp_path))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, out.stdout + out.stderr
    _, cause, seconds = lines[0].split()
    assert cause in ("URLError", "ConnectionRefusedError", "OSError", "HTTPError"), cause
    assert float(seconds) < 10.0


# ----------------------------------------------------------------------------------------------
# The Julia project and its juliapkg.json
# ----------------------------------------------------------------------------------------------



def test_packaging_ships_the_julia_project():
    """The wheel must carry julia/ as the data package ``pyode_bridge_julia`` (juliapkg finds a
    juliapkg.json one folder deep in site-packages; its ``path`` "." is then the package)."""
    from setuptools import find_namespace_packages

    tool = read_toml(REPO / "pyproject.toml").get("tool", {}).get("setuptools", {})
    packages = tool.get("packages")
    if not isinstance(packages, list):
        pytest.skip("pyproject.toml does not list its packages yet, so julia/ is not shipped as "
                    "pyode_bridge_julia (see docs/julia.md, 'Packaging')")
    found = find_namespace_packages(where=str(REPO), include=["pyode_bridge*"],
                                    exclude=["*.__pycache__"])
    missing = sorted(set(found) - set(packages))
    assert not missing, f"packages missing from pyproject.toml: {missing}"
    assert tool.get("package-dir", {}).get("pyode_bridge_julia") == "julia"
    data = tool.get("package-data", {}).get("pyode_bridge_julia", [])
    for needed in ("juliapkg.json", "Project.toml", "src/*.jl", "ext/*.jl"):
        assert needed in data, needed


# ----------------------------------------------------------------------------------------------
# Argument mapping (pure Python)
# ----------------------------------------------------------------------------------------------

def test_sensitivity_names_and_default():
    assert resolve_sensitivity(None) == JuliaSensitivity("gauss")
    for kind, sciml in SENSITIVITY_KINDS.items():
        s = resolve_sensitivity(kind)
        assert s.kind == kind and s.sciml_name == sciml
    assert resolve_sensitivity("backsolve").uses_checkpointing is True
    assert resolve_sensitivity("interpolating").uses_checkpointing is False
    assert JuliaSensitivity("gauss", checkpointing=True).uses_checkpointing is True


@pytest.mark.parametrize("name", ["backprop", "checkpointed", "interpolated", "adjoint"])
def test_torch_only_sensitivities_are_refused_with_the_list(name):
    with pytest.raises(ValueError) as info:
        resolve_sensitivity(name)
    for kind in SENSITIVITY_KINDS:
        assert repr(kind) in str(info.value)


def test_torch_sensitivity_objects_carry_over():
    s = resolve_sensitivity(pob.Interpolating(checkpointing=True, rtol=1e-5, atol=1e-7))
    assert s == JuliaSensitivity("interpolating", checkpointing=True, rtol=1e-5, atol=1e-7)
    s = resolve_sensitivity(pob.Backsolve(rtol=1e-6))
    assert s.kind == "backsolve" and s.rtol == 1e-6 and s.uses_checkpointing
    with pytest.raises(ValueError, match="every"):
        resolve_sensitivity(pob.Interpolating(every=2))
    with pytest.raises(ValueError, match="on_instability"):
        resolve_sensitivity(pob.Backsolve(on_instability="raise"))
    with pytest.raises(ValueError, match="not offered"):
        resolve_sensitivity(pob.Interpolated())
    with pytest.raises(ValueError, match="checkpointing"):
        JuliaSensitivity("quadrature", checkpointing=True)


def test_a_gradient_method_of_ones_own_names_its_julia_counterpart():
    """The julia backend asks the method for its counterpart instead of testing its class: a sixth
    method that names one carries over with its settings; one that names none is refused."""

    class QuadratureLike(pob.Sensitivity):
        name = "quadrature_like"

        def solve(self, prob, y0):
            raise AssertionError("the julia backend never solves through this method")

        def sciml_counterpart(self):
            return "quadrature", {"rtol": 1e-6}

    s = resolve_sensitivity(QuadratureLike())
    assert s == JuliaSensitivity("quadrature", rtol=1e-6) and s.sciml_name == "QuadratureAdjoint"
    with pytest.raises(ValueError, match="not offered"):
        resolve_sensitivity(type("Mine", (pob.Sensitivity,), {"solve": lambda self, prob, y0: None})())
    with pytest.raises(ValueError):
        JuliaSensitivity("gauss", rtol=-1.0)


def test_bad_arguments_fail_before_julia_is_needed(no_julia):
    net, y0, t = _problem()
    with pytest.raises(ValueError, match="not offered by backend='julia'"):
        pob.odeint(lambda tt, y: net(y), y0, t, backend="julia", sensitivity="backprop")
    # the default sensitivity on the julia backend is GaussAdjoint: valid, so Julia is needed
    with pytest.raises(pob.BackendUnavailableError):
        pob.odeint(lambda tt, y: net(y), y0, t, backend="julia")
    with pytest.raises(ValueError, match="controller"):
        pob.odeint(lambda tt, y: net(y), y0, t, backend="julia", sensitivity="gauss",
                   options={"safety": 0.8})


def test_method_names():
    assert julia_method("tsit5") == ("Tsit5", False)
    assert julia_method("dopri5") == ("DP5", False)
    assert julia_method("rk4") == ("RK4", True)
    assert julia_method("euler") == ("Euler", True)
    # every torch-backend method has a SciML twin, or is declared torch-only (and refused)
    assert set(METHODS) | TORCH_ONLY_METHODS == set(pob.TABLEAUX)
    assert julia_method("radauIIA5") == ("RadauIIA5", True)
    with pytest.raises(ValueError, match="no OrdinaryDiffEq twin"):
        julia_method("gl4")
    assert julia_method("Rodas5P") == ("Rodas5P", None)
    for bad in ("Tsit5()", "rm -rf", "", "Vern7; x"):
        with pytest.raises(ValueError):
            julia_method(bad)


def test_solver_options_adaptive():
    t = [0.0, 0.5, 1.0]
    kw = solver_kwargs(make_config("dopri5", None, 1e-6, 1e-8, torch.float64), t, False)
    assert kw == {"abstol": 1e-8, "reltol": 1e-6, "maxiters": 10_000, "dt": None,
                  "adaptive": None, "dtmax": None, "tstops": None}
    cfg = make_config("tsit5", {"first_step": 0.01, "max_step": 0.1, "max_num_steps": 50},
                      1e-5, 1e-7, torch.float64)
    kw = solver_kwargs(cfg, t, False)
    assert (kw["dt"], kw["dtmax"], kw["maxiters"]) == (0.01, 0.1, 50)
    assert "tstops" not in solver_kwargs(cfg, t, False, adjoint=True)


def test_solver_options_fixed_step():
    t = [0.0, 0.25, 1.0]
    cfg = make_config("rk4", None, 1e-6, 1e-8, torch.float64)
    kw = solver_kwargs(cfg, t, True)
    assert kw["adaptive"] is False and kw["dt"] == 1.0 and kw["tstops"] == t  # steps on t
    adj = solver_kwargs(cfg, t, True, adjoint=True)
    assert adj["adaptive"] is False and adj["dt"] == 0.75 and "tstops" not in adj
    kw = solver_kwargs(make_config("euler", {"step_size": 0.05}, 1e-6, 1e-8, torch.float64), t, True)
    assert (kw["dt"], kw["adaptive"], kw["tstops"]) == (0.05, False, None)
    with pytest.raises(ValueError, match="grid"):
        solver_kwargs(make_config("euler", {"grid": t}, 1e-6, 1e-8, torch.float64), t, True)
    with pytest.raises(ValueError, match="controller"):
        solver_kwargs(make_config("dopri5", {"ifactor": 5.0}, 1e-6, 1e-8, torch.float64), t, False)


# ----------------------------------------------------------------------------------------------
# Parameters and tensor hand-off (pure Python)
# ----------------------------------------------------------------------------------------------

def test_flat_params_round_trip_and_views():
    a = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    fp = FlatParams((a, b))
    flat = fp.flatten()
    assert flat.shape == (10,)
    ua, ub = fp.unflatten(flat)
    assert torch.equal(ua, a) and torch.equal(ub, b)
    flat[0] = 123.0
    assert ua[0, 0] == 123.0  # views, not copies
    g = fp.flatten_grads([None, torch.ones(4, dtype=torch.float64)], like=flat)
    assert torch.equal(g, torch.cat([torch.zeros(6, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]))
    with pytest.raises(ValueError):
        fp.unflatten(torch.zeros(9))
    empty = FlatParams(())
    assert empty.flatten(dtype=torch.float32).shape == (0,)
    assert empty.flatten_grads([], like=flat).shape == (0,)


def test_vector_hand_off_is_zero_copy():
    x = torch.arange(6, dtype=torch.float64)
    arr = vector_to_julia(x)
    assert isinstance(arr, np.ndarray) and np.shares_memory(arr, x.numpy())
    strided = torch.arange(12, dtype=torch.float32)[::2]
    arr = vector_to_julia(strided)
    assert arr.flags.c_contiguous and np.array_equal(arr, strided.numpy())
    back = julia_view(arr)
    assert back.data_ptr() == arr.ctypes.data  # NumPy -> torch without a copy
    with pytest.raises(TypeError):
        vector_to_julia(torch.arange(3))


def test_matrix_hand_off_orientation():
    G = torch.arange(12, dtype=torch.float64).reshape(4, 3)  # (T, N)
    arr = matrix_to_julia(G)
    assert arr.shape == (3, 4) and arr.flags.f_contiguous  # what Julia sees: N x T column-major
    assert np.shares_memory(arr, G.numpy())
    for j in range(4):
        assert np.array_equal(arr[:, j], G[j].numpy())
    # A Julia N x T matrix (Fortran-ordered buffer) comes back as (T, N), copied.
    jl = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    ys = matrix_from_julia(jl)
    assert ys.shape == (4, 3) and torch.equal(ys, torch.from_numpy(jl.T.copy()))
    assert not np.shares_memory(ys.numpy(), jl)
    # A CUDA-shared Julia matrix (cuda_view) arrives with its dimensions reversed; julia_view undoes it.
    shared = torch.from_numpy(jl.T.copy())  # what cuda_view gives for a 3x4 Julia array
    assert torch.equal(julia_view(shared), torch.from_numpy(jl))


def test_write_into_julia_buffers_in_place():
    buf = np.zeros(3)
    write(buf, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert buf.tolist() == [1.0, 2.0, 3.0]
    J = np.zeros((2, 2), order="F")  # a Julia matrix
    write(J, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    assert J[0, 1] == 2.0 and J[1, 0] == 3.0
    with pytest.raises(TypeError):
        julia_view(np.zeros(3, dtype=np.int64))


def test_cuda_carrier_describes_the_tensor_memory():
    x = torch.arange(6, dtype=torch.float32)
    carrier = CudaCarrier(x)
    assert (carrier.ptr, carrier.numel, carrier.typestr) == (x.data_ptr(), 6, "<f4")
    assert carrier.tensor is x  # keeps the memory alive while Julia copies it
    assert not hasattr(carrier, "__array__") and not hasattr(carrier, "__array_interface__")
    assert CudaCarrier(x.double()).typestr == "<f8"
    with pytest.raises(ValueError, match="contiguous"):
        CudaCarrier(torch.zeros(4, 4)[:, 0])


def test_cuda_interface_reads_julia_memory_in_julias_order():
    """What cuda_view hands torch for a Julia CuArray: C-ordered, dimensions reversed. The same
    dictionary as an __array_interface__ (host memory) must read a column-major Julia matrix
    back correctly, which checks shape/order/typestr without a GPU."""
    jl = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))  # Julia's 3 x 4
    iface = cuda_interface(jl.ctypes.data, tuple(reversed(jl.shape)), "<f8")
    assert iface["data"] == (jl.ctypes.data, False) and iface["strides"] is None

    class Host:
        __array_interface__ = {**iface, "version": 3}

    seen = julia_view(torch.from_numpy(np.asarray(Host())))  # torch view, as from cuda_view
    assert torch.equal(seen, torch.from_numpy(jl))
    with pytest.raises(TypeError):
        cuda_interface(0, (3,), "<i8")


# ----------------------------------------------------------------------------------------------
# The callbacks Julia calls (NumPy arrays stand in for the Julia buffers)
# ----------------------------------------------------------------------------------------------

def _buffers(n, p):
    return np.zeros(n), np.zeros(n), np.zeros(p)


@pytest.mark.parametrize("mode", ["module", "closure"])
def test_rhs_forward_and_vjp_match_autograd(mode):
    field = Field()
    params = tuple(field.parameters())
    func = field if mode == "module" else (lambda t, y: field(t, y))
    spec = StateSpec(torch.zeros(3, dtype=torch.float64))
    rhs = TorchRHS(func, spec, params, torch.float64, "Tsit5")
    assert rhs.functional is (mode == "module")
    u = np.array([0.3, -0.2, 0.9])
    p = rhs.flat.flatten().numpy().copy()
    t = 0.4
    du, gu, gp = _buffers(3, p.size)
    rhs.forward(du, u, p, t)
    expected = field(torch.tensor(t, dtype=torch.float64), torch.from_numpy(u)).detach()
    np.testing.assert_allclose(du, expected.numpy(), rtol=1e-14)

    lam = np.array([1.0, -2.0, 0.5])
    du2 = np.zeros(3)
    token = rhs.forward_graph(du2, u, p, t)
    np.testing.assert_allclose(du2, du, rtol=1e-14)
    rhs.pullback(token, lam, gu, gp)
    assert rhs._graphs == {}  # the graph was freed

    y = torch.tensor(u, requires_grad=True)
    out = field(torch.tensor(t, dtype=torch.float64), y)
    ref = torch.autograd.grad(out, (y, *params), torch.from_numpy(lam))
    np.testing.assert_allclose(gu, ref[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(gp, torch.cat([g.reshape(-1) for g in ref[1:]]).numpy(), rtol=1e-12)
    assert (rhs.nfe, rhs.nvjp) == (1, 1)


def test_rhs_uses_the_parameters_julia_passes():
    field = Field()
    spec = StateSpec(torch.zeros(3, dtype=torch.float64))
    rhs = TorchRHS(field, spec, tuple(field.parameters()), torch.float64, "Tsit5")
    u = np.array([0.3, -0.2, 0.9])
    p2 = (2 * rhs.flat.flatten()).numpy()
    du = np.zeros(3)
    rhs.forward(du, u, p2, 0.0)
    with torch.no_grad():
        W2, b2 = 2 * field.W, 2 * field.b
        expected = torch.tanh(W2 @ torch.from_numpy(u) + b2)
    np.testing.assert_allclose(du, expected.numpy(), rtol=1e-14)


def test_rhs_tuple_state_and_no_parameters():
    spec = StateSpec((torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)))

    def func(t, state):
        z, logp = state
        return -z, (z ** 2).sum().reshape(1)

    rhs = TorchRHS(func, spec, (), torch.float64, "Tsit5")
    u, p = np.array([1.0, 2.0, 0.0]), np.zeros(0)
    du, gu, gp = _buffers(3, 0)
    rhs.forward(du, u, p, 0.0)
    assert du.tolist() == [-1.0, -2.0, 5.0]
    token = rhs.forward_graph(np.zeros(3), u, p, 0.0)
    rhs.pullback(token, np.array([1.0, 1.0, 1.0]), gu, gp)
    assert gu.tolist() == [-1.0 + 2.0, -1.0 + 4.0, 0.0]


def test_rhs_jacobian_and_time_derivative():
    field = Field()
    spec = StateSpec(torch.zeros(3, dtype=torch.float64))
    rhs = TorchRHS(field, spec, tuple(field.parameters()), torch.float64, "Rodas5P")
    u = np.array([0.3, -0.2, 0.9])
    p = rhs.flat.flatten().numpy().copy()
    J = np.zeros((3, 3), order="F")
    rhs.jac(J, u, p, 0.7)
    tt = torch.tensor(0.7, dtype=torch.float64)
    ref = torch.autograd.functional.jacobian(lambda y: field(tt, y), torch.from_numpy(u))
    np.testing.assert_allclose(J, ref.detach().numpy(), rtol=1e-12)
    dT = np.zeros(3)
    rhs.tgrad(dT, u, p, 0.7)
    with torch.no_grad():
        expected = torch.tanh(field.W @ torch.from_numpy(u) + field.b)  # d/dt of (1 + t) * g
    np.testing.assert_allclose(dT, expected.numpy(), rtol=1e-12)
    autonomous = TorchRHS(lambda tt, y: -y, spec, (), torch.float64, "Rodas5P")
    dT[:] = 1.0
    autonomous.tgrad(dT, u, np.zeros(0), 0.7)
    assert dT.tolist() == [0.0, 0.0, 0.0]


def test_rhs_remembers_the_python_error():
    spec = StateSpec(torch.zeros(3, dtype=torch.float64))
    rhs = TorchRHS(lambda t, y: y[:2], spec, (), torch.float64, "Tsit5")
    with pytest.raises(pob.SolverError, match="shape"):
        rhs.forward(np.zeros(3), np.ones(3), np.zeros(0), 0.5)
    assert isinstance(rhs.error, pob.SolverError)


# ----------------------------------------------------------------------------------------------
# With Julia: the julia backend against the torch backend
# ----------------------------------------------------------------------------------------------

_OK, _WHY = _loader.julia_available()
needs_julia = pytest.mark.skipif(not _OK, reason=f"needs Julia: {_WHY}")

# method -> (torch options, tolerance on ys, relative tolerance on gradients)
_METHODS = {
    "tsit5": ({}, 1e-7, 1e-5),
    "dopri5": ({}, 1e-7, 1e-5),
    "rk4": ({"step_size": 0.01}, 1e-9, 1e-5),
    "euler": ({"step_size": 0.001}, 1e-9, 2e-2),
}


def _loss_and_grads(ys, y0, params):
    loss = (ys ** 2).sum() + ys[-1].sum()
    return [g.detach().clone() for g in torch.autograd.grad(loss, (y0, *params))]


@pytest.mark.julia
@needs_julia
@pytest.mark.parametrize("sensitivity", list(SENSITIVITY_KINDS))
@pytest.mark.parametrize("method", list(_METHODS))
def test_julia_matches_torch(method, sensitivity):
    options, tol_y, tol_g = _METHODS[method]
    field = Field()
    params = tuple(field.parameters())
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    kw = dict(rtol=1e-10, atol=1e-10, method=method, options=options or None)
    ys_t = pob.odeint(field, y0, t, sensitivity="backprop", **kw)
    stats = pob.SolveStats()
    ys_j = pob.odeint(field, y0, t, sensitivity=sensitivity, backend="julia", stats=stats, **kw)
    assert ys_j.shape == ys_t.shape and ys_j.dtype == ys_t.dtype
    torch.testing.assert_close(ys_j, ys_t, rtol=tol_y, atol=tol_y)
    g_t = _loss_and_grads(ys_t, y0, params)
    g_j = _loss_and_grads(ys_j, y0, params)
    for a, b in zip(g_j, g_t):
        torch.testing.assert_close(a, b, rtol=tol_g, atol=tol_g * b.abs().max().item())
    assert stats.nfe_forward > 0 and stats.steps_forward > 0 and stats.nfe_backward > 0


@pytest.mark.julia
@needs_julia
def test_julia_float32_tuple_state_and_no_grad():
    field = Field(torch.float32)
    z0 = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4)

    def func(tt, state):
        z, logp = state
        dz = field(tt, z)
        return dz, -(dz ** 2).sum().reshape(1)

    y0 = (z0, torch.zeros(1))
    ref = pob.odeint(func, y0, t, rtol=1e-6, atol=1e-6)
    out = pob.odeint(func, y0, t, rtol=1e-6, atol=1e-6, backend="julia", sensitivity="interpolating")
    assert isinstance(out, tuple) and out[0].dtype == torch.float32
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out[0].sum().backward()
    assert z0.grad is not None and torch.isfinite(z0.grad).all()
    with torch.no_grad():
        plain = pob.odeint(func, y0, t, rtol=1e-6, atol=1e-6, backend="julia", sensitivity="gauss")
    torch.testing.assert_close(plain[0], out[0].detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.julia
@needs_julia
def test_julia_stiff_method_passed_through():
    from pyode_bridge.backends.julia import odeint_julia

    A = torch.tensor([[-1000.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(A)
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    cfg = make_config(None, None, 1e-8, 1e-10, torch.float64)
    ys = odeint_julia(lambda tt, y: lin(y), y0, t, spec=StateSpec(y0), t_eval=t.tolist(), config=cfg,
                      adjoint_config=cfg, sensitivity="gauss", params=tuple(lin.parameters()),
                      stats=pob.SolveStats(), julia_method="Rodas5P")
    exact = torch.stack([torch.linalg.matrix_exp(A * float(s)) @ y0 for s in t])
    torch.testing.assert_close(ys, exact, rtol=1e-6, atol=1e-8)


@pytest.mark.julia
@needs_julia
def test_julia_python_errors_come_back_as_themselves():
    def func(tt, y):
        if float(tt) > 0.5:
            raise KeyError("from the right-hand side")
        return -y

    with pytest.raises(KeyError, match="from the right-hand side"):
        pob.odeint(func, torch.ones(2, dtype=torch.float64), torch.linspace(0, 1, 3,
                   dtype=torch.float64), backend="julia", sensitivity="gauss")


@pytest.mark.julia
@pytest.mark.slow
@needs_julia
def test_julia_package_runtests():
    """julia/test/runtests.jl, run by the Julia juliapkg installed (fresh process)."""
    script = REPO / "julia" / "test" / "runtests.jl"
    code = f"import juliacall; juliacall.Main.include({str(script)!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=1800, cwd=str(REPO))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def _cuda_round_trip(device: str):
    """Forward and backward on ``device`` against the same on the CPU (both on backend='julia')."""
    field = Field()
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    kw = dict(backend="julia", sensitivity="gauss", rtol=1e-8, atol=1e-10)
    cpu = pob.odeint(field, y0, t, **kw)
    g_cpu = _loss_and_grads(cpu, y0, tuple(field.parameters()))
    dev = torch.device(device)
    field_d = Field().to(dev)
    y0_d = y0.detach().to(dev).requires_grad_(True)
    gpu = pob.odeint(field_d, y0_d, t.to(dev), **kw)
    assert gpu.device == dev
    g_gpu = _loss_and_grads(gpu, y0_d, tuple(field_d.parameters()))  # the backward: no hang
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=1e-6, atol=1e-8)
    for a, b in zip(g_gpu, g_cpu):
        assert a.device == dev
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-8)


@pytest.mark.julia
@pytest.mark.cuda
@pytest.mark.timeout(1800)
@needs_julia
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_julia_cuda_forward_and_backward_match_cpu():
    """Issue 11: the CUDA backward used to run on torch's device thread and hang in Julia's GC."""
    _cuda_round_trip("cuda:0")


@pytest.mark.julia
@pytest.mark.cuda
@pytest.mark.timeout(1800)
@needs_julia
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_julia_cuda_second_device():
    """Julia's buffers must live on the tensors' device (cuda:1 = DDP rank 1), not on device 0."""
    _cuda_round_trip("cuda:1")


@pytest.mark.julia
@needs_julia
@pytest.mark.parametrize("kind", ["interpolating", "gauss"])
def test_julia_refuses_fixed_step_checkpointing_before_solving(kind):
    from pyode_bridge.backends.julia import JuliaSensitivity

    field = Field()
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="checkpoint"):
        pob.odeint(field, y0, torch.linspace(0, 1, 3, dtype=torch.float64), backend="julia",
                   method="euler", sensitivity=JuliaSensitivity(kind, checkpointing=True))


@pytest.mark.julia
@needs_julia
def test_julia_diffeqpy_algorithm_objects():
    """diffeqpy's algorithm objects as method=/adjoint_method=; ForwardDiff implicit ones refused."""
    de = pytest.importorskip("diffeqpy.de", reason="needs diffeqpy (pip install 'pyode-bridge[diffeqpy]')")
    field = Field()
    params = tuple(field.parameters())
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)
    kw = dict(rtol=1e-10, atol=1e-10)
    ref = pob.odeint(field, y0, t, sensitivity="backprop", **kw)
    ys = pob.odeint(field, y0, t, backend="julia", sensitivity="gauss", method=de.Vern7(), **kw)
    torch.testing.assert_close(ys, ref, rtol=1e-7, atol=1e-7)
    for a, b in zip(_loss_and_grads(ys, y0, params), _loss_and_grads(ref, y0, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    stiff = de.Rodas5P(autodiff=de.AutoFiniteDiff())
    ys = pob.odeint(field, y0, t, backend="julia", sensitivity="interpolating", method=stiff,
                    adjoint_method=stiff, **kw)
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="AutoFiniteDiff"):
        pob.odeint(field, y0, t, backend="julia", sensitivity="gauss", method=de.Rodas5P(), **kw)
