"""The Python half of backend="julia", tested here without Julia.

Stand-ins are used for what only Julia could provide (a recording "bridge" in place of the
PyodeBridge module, a fake ``juliacall`` module exposing ``ValueBase``, a fake ``juliapkg``): they
test the Python logic only — what is passed to Julia, on which thread, and what is refused before
Julia is needed. None of them shows that the Julia side works; that is julia/test/runtests.jl and
the tests marked ``julia`` (skipped here with the reason).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import types

import numpy as np
import pytest
import torch
from torch import nn

import pyode_bridge as pob
from pyode_bridge._state import StateSpec
from pyode_bridge.backends.julia import JuliaSensitivity, _loader
from pyode_bridge.backends.julia import _solve as jsolve
from pyode_bridge.backends.julia._options import is_julia_value, julia_method, method_label
from pyode_bridge.backends.julia._rhs import TorchRHS

_JULIA_VARS = ("PYTHON_JULIACALL_EXE", "PYTHON_JULIACALL_PROJECT", "PYTHON_JULIACALL_BINDIR",
               "PYTHON_JULIAPKG_EXE", "PYTHON_JULIAPKG_PROJECT", "PYTHON_JULIAPKG_OFFLINE",
               "JULIA_DEPOT_PATH", "JULIAUP_DEPOT_PATH", "CONDA_PREFIX", _loader.DOWNLOAD_ENV,
               _loader.CUDA_ENV, "PYTHON_JULIACALL_THREADS", "PYTHON_JULIACALL_HANDLE_SIGNALS")
POSIX = pytest.mark.skipif(os.name == "nt", reason="uses POSIX shell scripts as fake executables")


def _julia_running() -> bool:
    jc = sys.modules.get("juliacall")
    return _loader._STATE["bridge"] is not None or (
        jc is not None and getattr(jc, "CONFIG", {}).get("inited", False))


@pytest.fixture
def state(monkeypatch):
    """An isolated loader state (Julia not started), restored afterwards; torch's backward
    threading setting of this thread is restored too."""
    if _julia_running():
        pytest.skip("Julia is running in this process; the loader state cannot be isolated")
    fresh = {"bridge": None, "host": None, "fatal": None, "cuda": False, "started": False,
             "thread": None, "thread_name": None}
    monkeypatch.setattr(_loader, "_STATE", fresh)
    before = torch._C._is_multithreading_enabled()
    yield fresh
    torch.autograd.set_multithreading_enabled(before)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in _JULIA_VARS:
        # set, then deleted: monkeypatch then restores the variable even if the code under test
        # sets it (delenv alone does not record an absent variable)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PYTHON_JULIAPKG_PROJECT", str(tmp_path / "julia_env"))
    monkeypatch.setattr(_loader, "_juliacall_installed", lambda: True)
    return bindir


def _fake_exe(bindir, name: str, body: str):
    path = bindir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


class Field(nn.Module):
    """f(t, y) = tanh(W y + b) * (1 + t)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5)
        self.b = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, t, y):
        return torch.tanh(self.W @ y + self.b) * (1 + t)


class FakeBridge:
    """Records what the Python side hands to PyodeBridge; answers with fixed arrays shaped like
    Julia's (N x T column-major outputs, flat gradients). Not Julia: it checks plumbing only."""

    def __init__(self, n: int, p: int, grad_y0, grad_p):
        self.n, self.p = n, p
        self.grad_y0, self.grad_p = np.asarray(grad_y0, float), np.asarray(grad_p, float)
        self.calls = []

    def PyRHS(self, *args):
        self.calls.append(("PyRHS", args, threading.get_ident()))
        return "jl-rhs"

    def forward_solve(self, rhs, u0, p, ts, alg, **kw):
        self.calls.append(("forward_solve", (alg, kw), threading.get_ident()))
        Y = np.asfortranarray(np.tile(np.asarray(u0, float)[:, None], (1, len(ts))))
        return "jl-sol", Y, True, "Success", float(ts[-1]), 3, 2, 0

    def adjoint_solve(self, sol, ts, G, alg, **kw):
        self.calls.append(("adjoint_solve", (alg, kw), threading.get_ident()))
        return self.grad_y0.copy(), self.grad_p.copy()


def _plan(bridge, field, sens="gauss", method="tsit5"):
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    spec = StateSpec(y0)
    params = tuple(field.parameters())
    cfg = pob._validate.make_config(method, None, 1e-6, 1e-8, torch.float64)
    from pyode_bridge.backends.julia._options import resolve_sensitivity, solver_kwargs

    rhs = TorchRHS(field, spec, params, torch.float64, "Tsit5")
    t = [0.0, 0.5, 1.0]
    return jsolve.JuliaPlan(bridge, rhs, spec, t, resolve_sensitivity(sens), "Tsit5", "Tsit5",
                            solver_kwargs(cfg, t, False), solver_kwargs(cfg, t, False, adjoint=True),
                            pob.SolveStats()), y0, params


# ----------------------------------------------------------------------------------------------
# Threads: backward on the Julia thread; a clear error, not a hang, from any other thread
# ----------------------------------------------------------------------------------------------

def test_loading_keeps_torch_backward_on_the_julia_thread(state, monkeypatch):
    torch.autograd.set_multithreading_enabled(True)
    bridge = object()
    monkeypatch.setattr(_loader, "preflight", lambda environ=None: None)
    monkeypatch.setattr(_loader, "_start", lambda found: ("host", bridge))
    assert _loader.load_julia() is bridge
    assert torch._C._is_multithreading_enabled() is False
    assert state["thread"] == threading.get_ident()


def test_julia_started_elsewhere_is_owned_by_the_main_thread(state, monkeypatch):
    """diffeqpy (or the user) imported juliacall first: Julia runs on the thread that imported it,
    normally the main thread; a pyode-bridge call from a worker thread must be refused."""
    host = types.SimpleNamespace(seval=lambda code: None, PyodeBridge="bridge")
    fake = types.SimpleNamespace(CONFIG={"inited": True}, newmodule=lambda name: host)
    monkeypatch.setitem(sys.modules, "juliacall", fake)
    errors = []

    def worker():
        _loader.load_julia()
        try:
            _loader.check_thread("a test call")
        except _loader.JuliaThreadError as e:
            errors.append(e)

    th = threading.Thread(target=worker, name="trainer")
    th.start()
    th.join()
    assert state["thread"] == threading.main_thread().ident
    assert len(errors) == 1 and "'trainer'" in str(errors[0])
    _loader.check_thread("from the main thread")  # allowed


def test_backward_from_another_thread_raises_instead_of_hanging(state):
    field = Field()
    bridge = FakeBridge(3, 12, [1.0, 2.0, 3.0], np.arange(12.0))
    state["thread"], state["thread_name"] = threading.get_ident(), threading.current_thread().name
    plan, y0, params = _plan(bridge, field)
    y0 = y0.requires_grad_(True)
    ys = jsolve._JuliaSolve.apply(plan, y0, *params)
    caught = []

    def worker():  # what torch's CUDA device thread, or a user's thread pool, would do
        try:
            ys.sum().backward(retain_graph=True)
        except Exception as e:  # noqa: BLE001 - inspected below
            caught.append(e)

    th = threading.Thread(target=worker, name="autograd-like")
    th.start()
    th.join(timeout=60)
    assert not th.is_alive(), "the backward pass hung"
    assert len(caught) == 1 and isinstance(caught[0], _loader.JuliaThreadError)
    msg = str(caught[0])
    assert "'autograd-like'" in msg and "set_multithreading_enabled(False)" in msg
    assert [c[0] for c in bridge.calls] == ["PyRHS", "forward_solve"]  # Julia was never called
    # from the Julia thread the same backward goes through, with the Julia gradients
    ys.sum().backward()
    assert bridge.calls[-1][0] == "adjoint_solve" and bridge.calls[-1][2] == threading.get_ident()
    torch.testing.assert_close(y0.grad, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(field.W.grad.reshape(-1), torch.arange(9.0, dtype=torch.float64))
    torch.testing.assert_close(field.b.grad, torch.arange(9.0, 12.0, dtype=torch.float64))


@pytest.mark.cuda
def test_torch_runs_cuda_backward_on_the_calling_thread_when_told():
    """The torch mechanism the julia backend relies on (no Julia needed): with multithreading
    disabled the backward of a CUDA graph runs on the calling thread, else on torch's device
    thread."""
    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            Probe.thread = threading.get_ident()
            return g * 2

    x = torch.ones(3, device="cuda", requires_grad=True)
    before = torch._C._is_multithreading_enabled()
    try:
        torch.autograd.set_multithreading_enabled(True)
        Probe.apply(x).sum().backward()
        assert Probe.thread != threading.get_ident()
        torch.autograd.set_multithreading_enabled(False)
        Probe.apply(x).sum().backward()
        assert Probe.thread == threading.get_ident()
    finally:
        torch.autograd.set_multithreading_enabled(before)


# ----------------------------------------------------------------------------------------------
# Device index hand-off and the callbacks handed to Julia
# ----------------------------------------------------------------------------------------------

def test_julia_argument_errors_become_value_errors(state):
    """A Julia ArgumentError (PyodeBridge refusing an argument) reaches the user as ValueError,
    other Julia failures as SolverError, and a Python callback's own exception as itself."""
    plan, _, _ = _plan(FakeBridge(3, 12, [0, 0, 0], np.zeros(12)), Field())
    err = plan._failure(RuntimeError("ArgumentError: Rodas5P would differentiate ..."),
                        "forward solve", "Rodas5P")
    assert isinstance(err, ValueError) and "Rodas5P would differentiate" in str(err)
    assert isinstance(plan._failure(RuntimeError("DomainError"), "forward solve", "Tsit5"),
                      pob.SolverError)
    plan.rhs.error = KeyError("from func")
    assert isinstance(plan._failure(RuntimeError("ArgumentError: x"), "forward solve", "T"), KeyError)


def test_device_args():
    assert jsolve.device_args(torch.device("cpu")) == ("cpu", -1)
    assert jsolve.device_args(torch.device("cuda", 1)) == ("cuda", 1)  # no GPU needed to map it
    assert jsolve.device_args(torch.device("cuda", 0)) == ("cuda", 0)


def test_plan_hands_julia_the_vjp_callback_and_device(state):
    field = Field()
    bridge = FakeBridge(3, 12, [0, 0, 0], np.zeros(12))
    plan, y0, _ = _plan(bridge, field)
    plan.forward(y0)
    name, args, _ = bridge.calls[0]
    assert name == "PyRHS"
    r = plan.rhs
    assert args[:6] == (r.forward, r.forward_graph, r.pullback, r.vjp, r.jac, r.tgrad)
    assert args[6:] == ("float64", "cpu", -1)


def _vjp_problem(mode="module"):
    field = Field()
    params = tuple(field.parameters())
    func = field if mode == "module" else (lambda t, y: field(t, y))
    spec = StateSpec(torch.zeros(3, dtype=torch.float64))
    rhs = TorchRHS(func, spec, params, torch.float64, "Tsit5")
    u = np.array([0.3, -0.2, 0.9])
    p = rhs.flat.flatten().numpy().copy()
    lam = np.array([1.0, -2.0, 0.5])
    y = torch.tensor(u, requires_grad=True)
    out = field(torch.tensor(0.4, dtype=torch.float64), y)
    ref = torch.autograd.grad(out, (y, *params), torch.from_numpy(lam))
    ref_u = ref[0].numpy()
    ref_p = torch.cat([g.reshape(-1) for g in ref[1:]]).numpy()
    return rhs, u, p, lam, out.detach().numpy(), ref_u, ref_p


@pytest.mark.parametrize("mode", ["module", "closure"])
@pytest.mark.parametrize("want", ["both", "u", "p"])
def test_vjp_callback_matches_autograd(mode, want):
    """The callback behind the ODEFunction's vjp/vjp_p hooks: f, (df/du)^T lam and (df/dp)^T lam
    from one forward and one backward; a product Julia did not ask for arrives as None."""
    rhs, u, p, lam, f_ref, ref_u, ref_p = _vjp_problem(mode)
    du = np.zeros(3)
    gu = np.zeros(3) if want in ("both", "u") else None
    gp = np.zeros(p.size) if want in ("both", "p") else None
    rhs.vjp(du, gu, gp, lam, u, p, 0.4)
    np.testing.assert_allclose(du, f_ref, rtol=1e-14)
    if gu is not None:
        np.testing.assert_allclose(gu, ref_u, rtol=1e-12)
    if gp is not None:
        np.testing.assert_allclose(gp, ref_p, rtol=1e-12)
    assert (rhs.nfe, rhs.nvjp) == (0, 1)
    assert all(q.grad is None for q in rhs.flat.params)  # nothing accumulated into .grad


def test_vjp_callback_of_a_field_independent_of_state_and_parameters():
    spec = StateSpec(torch.zeros(2, dtype=torch.float64))
    rhs = TorchRHS(lambda t, y: torch.ones(2, dtype=torch.float64) * t, spec, (), torch.float64,
                   "Tsit5")
    du, gu, gp = np.zeros(2), np.full(2, 9.0), np.zeros(0)
    rhs.vjp(du, gu, gp, np.ones(2), np.zeros(2), np.zeros(0), 0.5)
    assert du.tolist() == [0.5, 0.5] and gu.tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Algorithm objects (diffeqpy interop) and refused plans, before Julia is needed
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_juliacall(monkeypatch):
    """A stand-in for an imported juliacall: only ``ValueBase`` (the class of wrapped Julia
    values) and an uninitialised CONFIG, so the loader does not treat Julia as running."""
    class ValueBase:
        def __init__(self, text):
            self.text = text

        def __str__(self):
            return self.text

    fake = types.SimpleNamespace(ValueBase=ValueBase, CONFIG={"inited": False})
    monkeypatch.setitem(sys.modules, "juliacall", fake)
    return ValueBase


def test_juliacall_values_are_recognised(fake_juliacall):
    vern7 = fake_juliacall("Vern7(; stage_limiter! = trivial_limiter!, lazy = true)")
    assert is_julia_value(vern7) and not is_julia_value("Vern7") and not is_julia_value(3)
    assert julia_method(vern7) == (vern7, None)
    assert method_label(vern7) == "Vern7"
    assert method_label(fake_juliacall("OrdinaryDiffEqTsit5.Tsit5{typeof(f)}(f)")) == \
        "OrdinaryDiffEqTsit5.Tsit5"
    with pytest.raises(ValueError, match="Julia algorithm object"):
        julia_method(object())


def test_juliacall_algorithm_objects_reach_julia_unchanged(state, fake_juliacall, monkeypatch):
    """odeint(..., method=de.Vern7(), adjoint_method=de.Rodas5P(autodiff=...)) hands those very
    objects to PyodeBridge's forward_solve/adjoint_solve (Julia then checks them)."""
    vern7 = fake_juliacall("Vern7()")
    rodas = fake_juliacall("Rodas5P(; autodiff = AutoFiniteDiff())")
    field = Field()
    bridge = FakeBridge(3, 12, [0.0, 0.0, 0.0], np.zeros(12))
    monkeypatch.setattr(jsolve, "load_julia", lambda: bridge)
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    ys = pob.odeint(field, y0, t, backend="julia", method=vern7, adjoint_method=rodas)
    ys.sum().backward()
    fwd = [c for c in bridge.calls if c[0] == "forward_solve"][0]
    adj = [c for c in bridge.calls if c[0] == "adjoint_solve"][0]
    assert fwd[1][0] is vern7 and adj[1][0] is rodas
    assert fwd[1][1]["adaptive"] is None  # the algorithm decides; Julia checks fixed-step ones


@pytest.fixture
def no_julia(monkeypatch, tmp_path, clean_env):
    if _julia_running():
        pytest.skip("Julia is already running in this process")
    monkeypatch.setattr(_loader, "_juliacall_installed", lambda: True)
    return clean_env


@pytest.mark.parametrize("kind", ["interpolating", "gauss"])
@pytest.mark.parametrize("method,options", [("euler", None), ("rk4", None), ("midpoint", None),
                                            ("tsit5", {"step_size": 0.1})])
def test_fixed_step_with_checkpointed_adjoint_is_refused(no_julia, kind, method, options):
    field = Field()
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        pob.odeint(field, y0, t, backend="julia", method=method, options=options,
                   sensitivity=JuliaSensitivity(kind, checkpointing=True))
    msg = str(info.value)
    assert "checkpoint" in msg and "quadrature" in msg and "backsolve" in msg
    assert "checkpointing=False" in msg


@pytest.mark.parametrize("sensitivity", ["gauss", "interpolating", "quadrature", "backsolve",
                                         JuliaSensitivity("gauss", checkpointing=True)])
def test_allowed_combinations_pass_the_check(no_julia, sensitivity):
    """Fixed-step with unchecked adjoints, and adaptive with checkpointing, are fine: they get as
    far as needing Julia (absent here)."""
    field = Field()
    y0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    method = "tsit5" if isinstance(sensitivity, JuliaSensitivity) else "rk4"
    with pytest.raises(pob.BackendUnavailableError):
        pob.odeint(field, y0, t, backend="julia", method=method, sensitivity=sensitivity)


# ----------------------------------------------------------------------------------------------
# Julia downloads and installs only with consent; GPU support opt-in
# ----------------------------------------------------------------------------------------------

def test_a_usable_julia_is_pinned_for_juliapkg():
    found = _loader.JuliaFound("/opt/julia/bin/julia", "julia on PATH", version=(1, 11, 2))
    env = {}
    assert _loader.pin_executable(found, env) == "/opt/julia/bin/julia"
    assert env == {"PYTHON_JULIAPKG_EXE": "/opt/julia/bin/julia"}
    env = {"PYTHON_JULIAPKG_EXE": "/mine/julia"}
    assert _loader.pin_executable(found, env) is None and env["PYTHON_JULIAPKG_EXE"] == "/mine/julia"
    old = _loader.JuliaFound("/old/julia", "julia on PATH", version=(1, 10, 2))
    env = {}
    assert _loader.pin_executable(old, env) is None and env == {}  # consent: juliapkg may replace it
    assert _loader.pin_executable(None, env) is None
    assert _loader.pin_executable(_loader.JuliaFound(None, "juliaup"), env) is None


@POSIX
def test_too_old_julia_with_consent_is_left_to_juliapkg_unless_named(clean_env, monkeypatch):
    exe = _fake_exe(clean_env, "julia", 'echo "julia version 1.10.0"')
    monkeypatch.setenv(_loader.DOWNLOAD_ENV, "yes")
    found = _loader.preflight()
    assert found.version == (1, 10, 0) and _loader.pin_executable(found, {}) is None
    monkeypatch.setenv("PYTHON_JULIAPKG_EXE", str(exe))  # named: juliapkg would use it as it is
    with pytest.raises(pob.BackendUnavailableError, match="named explicitly"):
        _loader.preflight()


def _juliaup(home, versions):
    judir = home / ".julia" / "juliaup"
    installed = {}
    for v in versions:
        key = f"{v}+0.x64.linux.gnu"
        installed[key] = {"Path": f"julia-{key}"}
        _fake_exe(judir / f"julia-{key}" / "bin", "julia", f'echo "julia version {v}"')
    judir.mkdir(parents=True, exist_ok=True)
    (judir / "juliaup.json").write_text(json.dumps({"InstalledVersions": installed}))
    return judir


@POSIX
def test_juliaup_installed_julia_is_used_without_installing(clean_env, tmp_path):
    _fake_exe(clean_env, "juliaup", "echo juliaup must not be run; exit 1")
    judir = _juliaup(tmp_path, ["1.10.2", "1.11.4", "1.10.5"])
    found = _loader.preflight()
    assert found.exe == str(judir / "julia-1.11.4+0.x64.linux.gnu" / "bin" / "julia")
    assert found.version == (1, 11, 4)
    env = {}
    assert _loader.pin_executable(found, env) == found.exe  # juliapkg will not `juliaup add`


@POSIX
def test_juliaup_without_a_usable_julia_needs_consent(clean_env, tmp_path, monkeypatch):
    _fake_exe(clean_env, "juliaup", "exit 1")
    _juliaup(tmp_path, ["1.9.4"])
    with pytest.raises(pob.BackendUnavailableError) as info:
        _loader.preflight()
    assert "juliaup add release" in str(info.value) and _loader.DOWNLOAD_ENV in str(info.value)
    monkeypatch.setenv(_loader.DOWNLOAD_ENV, "yes")
    found = _loader.preflight()
    assert found.exe is None  # with consent juliapkg may install one through juliaup


class FakeJuliapkg(types.ModuleType):
    """Records juliapkg.add/resolve (the Python logic of GPU opt-in; nothing is installed)."""

    def __init__(self, log):
        super().__init__("juliapkg")
        self.log = log

    def add(self, name, uuid, **kw):
        self.log.append(("add", name, uuid, kw))

    def resolve(self, **kw):
        self.log.append(("resolve",))

    def project(self):
        return "/nowhere"


def test_install_cuda_adds_cuda_with_the_project_bound_before_julia_starts(state, clean_env,
                                                                        monkeypatch):
    log = []
    monkeypatch.setitem(sys.modules, "juliapkg", FakeJuliapkg(log))
    found = _loader.JuliaFound("/opt/julia/bin/julia", "julia on PATH", version=(1, 11, 0))
    monkeypatch.setattr(_loader, "preflight", lambda environ=None: found)
    env = {}
    _loader.install_cuda(env)
    uuid, compat = _loader.CUDA_PACKAGES["CUDA"]
    assert log == [("add", "CUDA", uuid, {"version": compat}), ("resolve",)]
    assert env["PYTHON_JULIAPKG_EXE"] == found.exe  # the same Julia; no download


def test_install_cuda_refuses_once_julia_has_started(state, monkeypatch):
    log = []
    monkeypatch.setitem(sys.modules, "juliapkg", FakeJuliapkg(log))
    state["bridge"] = object()
    with pytest.raises(RuntimeError) as info:
        _loader.install_cuda({})
    assert "before Julia starts" in str(info.value) and _loader.CUDA_ENV in str(info.value)
    assert log == []


def test_install_cuda_with_a_user_managed_project_says_what_to_do(state, monkeypatch):
    monkeypatch.setitem(sys.modules, "juliapkg", FakeJuliapkg([]))
    env = {"PYTHON_JULIACALL_EXE": "/x/julia", "PYTHON_JULIACALL_PROJECT": "/x/proj"}
    with pytest.raises(RuntimeError, match='Pkg.add\\(name="CUDA"'):
        _loader.install_cuda(env)


def test_cuda_env_var_adds_cuda_before_juliacall_starts(state, clean_env, monkeypatch):
    log = []
    monkeypatch.setitem(sys.modules, "juliapkg", FakeJuliapkg(log))
    monkeypatch.setenv(_loader.CUDA_ENV, "1")

    class Stop(Exception):
        pass

    def fake_import():
        log.append(("import juliacall",))
        raise Stop

    monkeypatch.setattr(_loader, "_import_juliacall", fake_import)
    found = _loader.JuliaFound("/opt/julia/bin/julia", "julia on PATH", version=(1, 11, 0))
    with pytest.raises(Stop):
        _loader._start(found)
    assert [e[0] for e in log] == ["add", "import juliacall"]
    assert os.environ["PYTHON_JULIAPKG_EXE"] == found.exe
    assert os.environ["PYTHON_JULIACALL_THREADS"] == "1"


def test_without_the_env_var_cpu_users_get_no_cuda(state, clean_env, monkeypatch):
    log = []
    monkeypatch.setitem(sys.modules, "juliapkg", FakeJuliapkg(log))
    monkeypatch.setenv("PYTHON_JULIACALL_THREADS", "1")

    class Stop(Exception):
        pass

    monkeypatch.setattr(_loader, "_import_juliacall", lambda: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        _loader._start(None)
    assert log == []


def test_cuda_tensors_without_cuda_jl_explain_the_opt_in(state):
    def seval(code):
        if code == "import CUDA":
            raise RuntimeError("ArgumentError: Package CUDA not found in current path")
        return True

    state["host"] = types.SimpleNamespace(seval=seval)
    state["bridge"] = object()
    with pytest.raises(pob.BackendUnavailableError) as info:
        _loader.load_cuda()
    msg = str(info.value)
    assert _loader.CUDA_ENV in msg and "install_cuda()" in msg and "already started" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
