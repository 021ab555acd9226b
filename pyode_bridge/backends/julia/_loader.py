"""Finding and starting Julia for ``backend="julia"``: bounded in time, never silent.

What happens on the first julia solve of a process (:func:`load_julia`):

1. **Preflight** (:func:`preflight`), in milliseconds and without starting anything. juliacall
   must be installed and a Julia must be at hand, looked for where juliacall/juliapkg look:
   ``PYTHON_JULIACALL_EXE`` (``-X juliacall-exe``) or ``PYTHON_JULIACALL_BINDIR``,
   ``PYTHON_JULIAPKG_EXE`` (``-X juliapkg-exe``), ``julia`` on ``PATH``, a Julia that juliaup
   installed, or a Julia that juliapkg downloaded earlier. A found executable must answer
   ``julia --version`` within :data:`PROBE_TIMEOUT_S` seconds and be at least
   :data:`MIN_JULIA` (juliacall's own minimum). The Julia found is handed to juliapkg
   (``PYTHON_JULIAPKG_EXE``), because juliapkg would otherwise look for the newest release online
   and install it (into its own folder, or with ``juliaup add``) even when a usable Julia is
   there. If no usable Julia is found, downloading one is allowed only when the user says so
   (``PYODE_BRIDGE_JULIA_DOWNLOAD=yes``): a download through a firewall that drops packets can
   hang, so it is never started by default. Any failure raises
   :class:`~pyode_bridge.BackendUnavailableError` at once, carrying the cause and the fixes; there
   is no fallback to the torch backend.
2. **Environment** (:func:`configure_environment`): one Julia thread unless the user asked for
   more (``PYTHON_JULIACALL_THREADS``), and with more than one, Julia's own signal handling
   (``PYTHON_JULIACALL_HANDLE_SIGNALS=yes``; Julia's GC relies on it). ``PYTHON_JULIACALL_EXE``
   set alone (juliacall wants it together with ``PYTHON_JULIACALL_PROJECT``) is turned into
   juliapkg's ``PYTHON_JULIAPKG_EXE`` plus the project juliapkg resolves.
3. **Start**: ``import juliacall``. The first time, juliapkg installs the Julia packages named by
   pyode-bridge's ``juliapkg.json`` and precompiles them (minutes, logged by juliapkg); later
   starts take a few seconds. GPU support (CUDA.jl) is added to them only on request
   (``PYODE_BRIDGE_JULIA_CUDA=1`` at this point, or :func:`install_cuda`). Then
   ``import PyodeBridge`` in a fresh Julia module. The thread that started Julia is recorded:
   Julia is only ever called from it (:func:`check_thread`), and torch's backward pass is kept on
   it (:func:`keep_backward_on_this_thread`).

Import order: juliacall warns that torch was imported first (torch/Julia library clashes,
pytorch#78829, PythonCall#215). pyode-bridge always imports torch first, so the warning is
replaced by one that names the remedy: ``import juliacall`` as the first import of the program
(an already-imported juliacall is used as it is).

A failure once ``import juliacall`` has begun is kept: Julia cannot be restarted within a
process, so later calls raise the same error at once.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...errors import BackendUnavailableError

__all__ = ["DOWNLOAD_ENV", "CUDA_ENV", "CUDA_PACKAGES", "PROBE_TIMEOUT_S", "MIN_JULIA",
           "API_VERSION", "JuliaFound", "locate_julia", "probe_version", "download_allowed",
           "preflight", "pin_executable", "julia_available", "configure_environment", "load_julia",
           "load_cuda", "install_cuda", "cuda_requested", "julia_started", "check_thread",
           "keep_backward_on_this_thread", "JuliaThreadError", "julia_project_dir",
           "unavailable_error"]

#: Set to ``yes`` to let juliapkg download (or juliaup install) Julia when no usable one is found.
DOWNLOAD_ENV = "PYODE_BRIDGE_JULIA_DOWNLOAD"
#: Set to ``1`` before the first julia solve of a process to install GPU support (CUDA.jl).
CUDA_ENV = "PYODE_BRIDGE_JULIA_CUDA"
#: The Julia packages GPU support adds: name -> (uuid, compat). Must match julia/Project.toml's
#: ``[weakdeps]`` and ``[compat]`` (checked by tests/test_julia_packaging.py).
CUDA_PACKAGES = {"CUDA": ("052768ef-5323-5732-b1bb-66c8b64840ba", "5, 6")}
#: Seconds a found executable gets to answer ``julia --version``.
PROBE_TIMEOUT_S = 30.0
#: Oldest Julia the backend accepts: juliacall's own minimum (its juliapkg.json: ^1.10.3).
MIN_JULIA = (1, 10, 3)
#: Must equal ``PyodeBridge.API_VERSION`` in julia/src/PyodeBridge.jl.
API_VERSION = 2

_TRUE = {"1", "yes", "true", "on"}
_LOCK = threading.RLock()
_STATE: dict = {"bridge": None, "host": None, "fatal": None, "cuda": False, "started": False,
                "thread": None, "thread_name": None}
_MIN_STR = ".".join(map(str, MIN_JULIA))

_TORCH_FIRST = (
    "pyode_bridge: juliacall is being started after torch was imported. On some systems this "
    "crashes at start-up or later (heap corruption, libstdc++/LLVM symbol clashes: pytorch#78829, "
    "PythonCall#215). If it does, make `import juliacall` the first import of your program, "
    "before torch and pyode_bridge; the julia backend then uses that juliacall.")


def _option(env_key: str, x_key: str, environ) -> tuple[str | None, str | None]:
    """A juliacall/juliapkg option: ``-X x_key=...`` wins over the environment variable."""
    value = sys._xoptions.get(x_key)
    if isinstance(value, str) and value:
        return value, f"-X {x_key}"
    value = environ.get(env_key)
    if value:
        return value, env_key
    return None, None


@dataclass(frozen=True)
class JuliaFound:
    """A Julia to use: ``exe`` (None when juliaup would have to install one), where it was found,
    whether the user named it (``explicit``: an environment variable or ``-X`` option), and its
    ``version`` once probed."""

    exe: str | None
    source: str
    explicit: bool = False
    version: tuple | None = None


def _parse_version(text: str) -> tuple | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in match.groups()) if match else None


def juliaup_julias(environ=None) -> list:
    """``[(version, exe)]`` of the Julias juliaup has installed, newest first, read from juliaup's
    own record (``juliaup.json``; nothing is run, nothing installed)."""
    environ = os.environ if environ is None else environ
    depot = environ.get("JULIAUP_DEPOT_PATH") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".julia")
    judir = Path(depot) / "juliaup"
    try:
        meta = json.loads((judir / "juliaup.json").read_text())
    except (OSError, ValueError):
        return []
    exe_name = "julia.exe" if os.name == "nt" else "julia"
    found = []
    for verstr, info in (meta.get("InstalledVersions") or {}).items():
        version = _parse_version(str(verstr))
        if version is None or not isinstance(info, dict) or "-" in str(verstr).split("+")[0]:
            continue  # unparsable or a prerelease
        if "BinaryPath" in info:
            exe = judir / info["BinaryPath"]
        elif "Path" in info:
            exe = judir / info["Path"] / "bin" / exe_name
        else:
            continue
        found.append((version, str(exe.resolve())))
    return sorted(found, reverse=True)


def juliapkg_project_dir(environ=None) -> Path:
    """The Julia project juliapkg installs into (its documented rule, without importing it)."""
    environ = os.environ if environ is None else environ
    project, _ = _option("PYTHON_JULIAPKG_PROJECT", "juliapkg-project", environ)
    if project:
        return Path(project)
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "julia_env"
    if environ.get("CONDA_PREFIX"):
        return Path(environ["CONDA_PREFIX"]) / "julia_env"
    depot = environ.get("JULIA_DEPOT_PATH", "").split(os.pathsep)[0]
    if not depot:
        depot = os.path.join(os.path.expanduser("~"), ".julia")
    return Path(depot) / "environments" / "pyjuliapkg"


def locate_julia(environ=None) -> tuple[JuliaFound | None, list[str]]:
    """Where juliacall/juliapkg would take Julia from, without downloading or running anything.

    Returns ``(found, looked)``: ``found`` is None when there is nothing to use; ``looked`` lists
    the places checked (for the error message).
    """
    environ = os.environ if environ is None else environ
    exe_name = "julia.exe" if os.name == "nt" else "julia"
    looked: list[str] = []
    for env_key, x_key in (("PYTHON_JULIACALL_EXE", "juliacall-exe"),
                           ("PYTHON_JULIAPKG_EXE", "juliapkg-exe")):
        value, src = _option(env_key, x_key, environ)
        if value:
            exe = shutil.which(value, path=environ.get("PATH")) or value
            return JuliaFound(exe, f"{src}={value}", explicit=True), looked
        looked.append(f"{env_key} (unset)")
        if env_key == "PYTHON_JULIACALL_EXE":
            bindir, src = _option("PYTHON_JULIACALL_BINDIR", "juliacall-home", environ)
            if bindir:
                return JuliaFound(os.path.join(bindir, exe_name), f"{src}={bindir}",
                                  explicit=True), looked
            looked.append("PYTHON_JULIACALL_BINDIR (unset)")
    path = environ.get("PATH", "")
    julia = shutil.which("julia", path=path)
    if julia:
        return JuliaFound(julia, f"julia on PATH ({julia})"), looked
    juliaup = shutil.which("juliaup", path=path)
    if juliaup:
        usable = [(v, exe) for v, exe in juliaup_julias(environ) if v >= MIN_JULIA]
        if usable:
            version, exe = usable[0]
            return JuliaFound(exe, f"Julia {'.'.join(map(str, version))} installed by juliaup "
                                   f"({exe})"), looked
        return JuliaFound(None, f"juliaup on PATH ({juliaup}), with no Julia >= {_MIN_STR} "
                                "installed"), looked
    looked.append("julia and juliaup on PATH")
    previous = juliapkg_project_dir(environ) / "pyjuliapkg" / "install" / "bin" / exe_name
    if previous.is_file():
        return JuliaFound(str(previous), f"installed by juliapkg earlier ({previous})"), looked
    looked.append(f"a Julia downloaded by juliapkg earlier ({previous})")
    return None, looked


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the probe and anything it started (it runs in its own session on POSIX)."""
    try:
        if os.name == "nt":
            proc.kill()
        else:
            os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def probe_version(exe: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[int, int, int]:
    """``exe --version`` as ``(major, minor, patch)``; raises if it fails or takes over ``timeout``."""
    proc = subprocess.Popen([exe, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=os.name != "nt")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        raise TimeoutError(f"`{exe} --version` did not answer within {timeout:g} s") from e
    match = re.search(r"julia version (\d+)\.(\d+)\.(\d+)", out or "")
    if proc.returncode != 0 or match is None:
        shown = (out or "").strip()[:200]
        raise RuntimeError(f"`{exe} --version` exited with {proc.returncode} and printed {shown!r}; "
                           "this is not a working Julia executable")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def download_allowed(environ=None) -> bool:
    """Whether juliapkg may download Julia: only on ``PYODE_BRIDGE_JULIA_DOWNLOAD=yes`` and not
    in juliapkg's offline mode."""
    environ = os.environ if environ is None else environ
    offline, _ = _option("PYTHON_JULIAPKG_OFFLINE", "juliapkg-offline", environ)
    return (environ.get(DOWNLOAD_ENV, "").strip().lower() in _TRUE
            and (offline or "").strip().lower() not in _TRUE)


def _juliacall_installed() -> bool:
    try:
        return importlib.util.find_spec("juliacall") is not None
    except (ImportError, ValueError):
        return False


def julia_project_dir() -> Path | None:
    """The PyodeBridge Julia project shipped with this package (or the checkout's ``julia/``)."""
    try:
        spec = importlib.util.find_spec("pyode_bridge_julia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "Project.toml").is_file():
                return Path(loc)
    checkout = Path(__file__).resolve().parents[3] / "julia"
    return checkout if (checkout / "Project.toml").is_file() else None


def unavailable_error(reason: str, cause: BaseException | None = None,
                      install_juliacall: bool = False) -> BackendUnavailableError:
    """The error raised when the julia backend cannot start: the reason, the cause, the fixes."""
    lines = [f'backend="julia" is unavailable: {reason}.']
    if cause is not None:
        lines.append(f"Cause: {type(cause).__name__}: {cause}")
    lines.append("Fixes:")
    if install_juliacall:
        lines.append("  - pip install 'pyode-bridge[julia]' (installs juliacall);")
    lines += [
        f"  - install Julia >= {_MIN_STR} (https://julialang.org/downloads, or juliaup) and put `julia` on "
        "PATH, or point PYTHON_JULIACALL_EXE (or PYTHON_JULIAPKG_EXE) at the executable; the Julia "
        "packages are then installed on first use (several minutes, once);",
        f"  - or let juliapkg download Julia (or juliaup install it): set {DOWNLOAD_ENV}=yes;",
        '  - or use backend="torch", which needs no Julia.',
        "See docs/julia.md of pyode-bridge.",
    ]
    return BackendUnavailableError("\n".join(lines))


def preflight(environ=None, timeout: float | None = None) -> JuliaFound | None:
    """Check, without starting Julia, that the backend can start; raise BackendUnavailableError
    if not. Returns the Julia found (with its version when it was probed), or None when none is
    found but downloading is allowed.

    A Julia older than :data:`MIN_JULIA` is refused unless downloads are allowed (juliapkg then
    fetches a newer one); one the user named explicitly is refused even then, since juliapkg
    would use it as it is.
    """
    environ = os.environ if environ is None else environ
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    if not _juliacall_installed():
        cause: Exception = ModuleNotFoundError("No module named 'juliacall'")
        raise unavailable_error("the juliacall package is not installed", cause,
                                install_juliacall=True) from cause
    found, looked = locate_julia(environ)
    allowed = download_allowed(environ)
    if found is None:
        if allowed:
            return None
        cause = FileNotFoundError("no Julia executable; looked at: " + "; ".join(looked))
        raise unavailable_error(f"no Julia was found and downloading one is not allowed "
                                f"({DOWNLOAD_ENV} is not set)", cause) from cause
    if found.exe is None:  # juliaup without a usable Julia: only juliaup could install one
        if allowed:
            return found
        cause = FileNotFoundError(f"{found.source}; juliapkg would run `juliaup add`")
        raise unavailable_error(f"juliaup has no Julia >= {_MIN_STR} installed and installing one is "
                                f"not allowed ({DOWNLOAD_ENV} is not set); run `juliaup add release`",
                                cause) from cause
    try:
        version = probe_version(found.exe, timeout)
    except Exception as e:  # noqa: BLE001 - re-raised with the fixes
        raise unavailable_error(f"the Julia from {found.source} does not run", e) from e
    found = replace(found, version=version)
    if version < MIN_JULIA and (found.explicit or not allowed):
        cause = RuntimeError(f"Julia {'.'.join(map(str, version))} at {found.exe} is older than "
                             f"{_MIN_STR} (juliacall's minimum)")
        why = "named explicitly, so juliapkg would use it as it is" if found.explicit else (
            f"downloading a newer one is not allowed ({DOWNLOAD_ENV} is not set)")
        raise unavailable_error(f"the Julia from {found.source} is too old ({why})", cause) from cause
    return found


def pin_executable(found: JuliaFound | None, environ=None) -> str | None:
    """Hand the usable Julia that :func:`preflight` found to juliapkg (``PYTHON_JULIAPKG_EXE``).

    Without it juliapkg looks for the newest compatible release online and installs it, into its
    own folder or with ``juliaup add``, even when a usable Julia is at hand. Returns the
    executable pinned, or None (nothing usable found, or the user already named one).
    """
    environ = os.environ if environ is None else environ
    if found is None or found.exe is None or found.version is None or found.version < MIN_JULIA:
        return None
    if _option("PYTHON_JULIAPKG_EXE", "juliapkg-exe", environ)[0]:
        return None
    environ["PYTHON_JULIAPKG_EXE"] = found.exe
    return found.exe


def julia_available(environ=None) -> tuple[bool, str]:
    """``(True, where)`` if :func:`preflight` passes, else ``(False, reason)``; starts nothing."""
    try:
        found = preflight(environ)
    except BackendUnavailableError as e:
        return False, str(e).splitlines()[0] + " " + str(e.__cause__ or "")
    return True, found.source if found is not None else "download allowed"


def configure_environment(environ=None) -> None:
    """Set juliacall's options for an embedded, single-threaded Julia (see the module doc)."""
    environ = os.environ if environ is None else environ
    threads, _ = _option("PYTHON_JULIACALL_THREADS", "juliacall-threads", environ)
    if threads is None:
        # juliacall would otherwise follow JULIA_NUM_THREADS; the RHS calls back into Python, and
        # with one Julia thread no Julia task can run Python code behind the GIL's back.
        environ["PYTHON_JULIACALL_THREADS"] = threads = "1"
    signals, _ = _option("PYTHON_JULIACALL_HANDLE_SIGNALS", "juliacall-handle-signals", environ)
    if threads != "1" and signals is None:
        environ["PYTHON_JULIACALL_HANDLE_SIGNALS"] = "yes"


def _juliacall_exe_alone(environ) -> str | None:
    exe, _ = _option("PYTHON_JULIACALL_EXE", "juliacall-exe", environ)
    project, _ = _option("PYTHON_JULIACALL_PROJECT", "juliacall-project", environ)
    return exe if exe and not project else None


def _import_juliacall():
    """``import juliacall``, replacing its torch-import-order warning with one naming the fix."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import juliacall
    torch_first = False
    for w in caught:
        if "torch was imported before juliacall" in str(w.message):
            torch_first = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if torch_first:
        warnings.warn(_TORCH_FIRST, RuntimeWarning, stacklevel=5)
    return juliacall


def _start(found: JuliaFound | None):
    configure_environment()
    pin_executable(found, os.environ)
    if cuda_requested() and not _user_project():
        _add_cuda_packages()
    exe_alone = _juliacall_exe_alone(os.environ)
    if exe_alone is not None:
        # juliacall needs PYTHON_JULIACALL_PROJECT with PYTHON_JULIACALL_EXE: let juliapkg resolve
        # (install) the packages with that Julia and hand its project to juliacall.
        os.environ.setdefault("PYTHON_JULIAPKG_EXE", exe_alone)
        import juliapkg

        juliapkg.resolve()
        os.environ["PYTHON_JULIACALL_PROJECT"] = juliapkg.project()
    _STATE["started"] = True
    juliacall = _import_juliacall()
    host = juliacall.newmodule("PyodeBridgeHost")
    try:
        host.seval("import PyodeBridge")
    except Exception as e:
        where = julia_project_dir()
        raise RuntimeError(
            "Julia started but cannot load the PyodeBridge package. juliapkg installs it from "
            "pyode-bridge's juliapkg.json; with PYTHON_JULIACALL_PROJECT pointing at a project you "
            "manage, add it there: `using Pkg; Pkg.develop(path=raw\"" + str(where) + "\")`") from e
    bridge = host.PyodeBridge
    version = int(bridge.API_VERSION)
    if version != API_VERSION:
        raise RuntimeError(
            f"the Julia package PyodeBridge has API version {version} but this pyode_bridge needs "
            f"{API_VERSION}; the Julia environment holds another copy of it. Reinstall pyode-bridge "
            "and run `python -m juliapkg resolve --force`.")
    return host, bridge


def _before_julia_init(e: BaseException) -> bool:
    """Whether ``e`` came from juliapkg (resolving or downloading), i.e. before juliacall started
    the Julia runtime, so that a later attempt in this process is safe."""
    tb = e.__traceback__
    marker = os.sep + "juliapkg" + os.sep
    while tb is not None:
        if marker in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def load_julia(environ=None):
    """Start Julia (once per process) and return the ``PyodeBridge`` Julia module.

    Records the thread that started Julia (:func:`check_thread`) and keeps torch's backward pass
    on it (:func:`keep_backward_on_this_thread`). A Julia that something else started before
    (e.g. ``from diffeqpy import de``) is used as it is; its thread is taken to be the main
    thread, where ``import juliacall`` normally runs.

    Raises:
        BackendUnavailableError: Julia cannot be had; ``__cause__`` is the underlying error.
    """
    with _LOCK:
        if _STATE["bridge"] is not None:
            return _STATE["bridge"]
        if _STATE["fatal"] is not None:
            fatal = _STATE["fatal"]
            raise unavailable_error("Julia failed to start earlier in this process (it cannot be "
                                    "restarted; start a new Python process)", fatal) from fatal
        jc = sys.modules.get("juliacall")
        already = jc is not None and getattr(jc, "CONFIG", {}).get("inited", False)
        found = None if already else preflight(environ)
        _STATE["started"] = False
        try:
            if already:
                host = jc.newmodule("PyodeBridgeHost")
                host.seval("import PyodeBridge")
                bridge = host.PyodeBridge
            else:
                host, bridge = _start(found)
        except Exception as e:  # noqa: BLE001 - re-raised as BackendUnavailableError
            if _STATE.get("started") and not _before_julia_init(e):
                _STATE["fatal"] = e
            reason = "Julia could not be started" if not already else "PyodeBridge could not be loaded"
            msg = str(e)
            if "entries are not unique" in msg:
                reason += (" (juliapkg found pyode-bridge's juliapkg.json twice: do not run from a "
                           "source checkout with a non-editable install, or install it editable)")
            raise unavailable_error(reason, e) from e
        owner = threading.main_thread() if already else threading.current_thread()
        _STATE["thread"], _STATE["thread_name"] = owner.ident, owner.name
        _STATE["host"], _STATE["bridge"] = host, bridge
        keep_backward_on_this_thread()
        return bridge


def julia_started() -> bool:
    """Whether Julia has started (or begun to start) in this process."""
    jc = sys.modules.get("juliacall")
    return (_STATE["bridge"] is not None or _STATE["fatal"] is not None
            or (jc is not None and getattr(jc, "CONFIG", {}).get("inited", False)))


class JuliaThreadError(RuntimeError):
    """A call into Julia from a thread other than the one running Julia."""


def check_thread(action: str = "a call into Julia") -> None:
    """Raise :class:`JuliaThreadError` unless this is the thread that started Julia.

    From another thread a Julia call can deadlock: its garbage collector waits for the Julia
    thread, which is blocked in the caller (torch's autograd engine, say) (PythonCall#578,
    CUDA.jl#2449). A clear error instead of a hang.
    """
    owner = _STATE.get("thread")
    if owner is None or owner == threading.get_ident():
        return
    here = threading.current_thread().name
    raise JuliaThreadError(
        f"{action} (backend='julia') was called from thread {here!r}, but Julia runs on thread "
        f"{_STATE.get('thread_name')!r}, the one that started it. Julia must only be called from "
        "that thread: from another one its garbage collector can wait forever. torch runs the "
        "backward pass of CUDA tensors on its own device threads; pyode-bridge turns that off "
        "for the Julia thread (torch.autograd.set_multithreading_enabled(False)): do not turn it "
        "back on, and call odeint(..., backend='julia') and .backward() from that thread "
        "(not from a DataLoader worker, a thread pool or another training thread).")


def keep_backward_on_this_thread() -> None:
    """Make torch run backward passes started from this thread on this thread.

    ``torch.autograd.set_multithreading_enabled(False)`` is thread-local: it affects backward
    passes started from the calling thread (the Julia thread) only, and there it costs the
    overlap of CUDA work across devices within one backward pass.
    """
    torch.autograd.set_multithreading_enabled(False)


def cuda_requested(environ=None) -> bool:
    """Whether GPU support was asked for with ``PYODE_BRIDGE_JULIA_CUDA=1``."""
    environ = os.environ if environ is None else environ
    return environ.get(CUDA_ENV, "").strip().lower() in _TRUE


def _user_project(environ=None) -> bool:
    """Whether juliacall uses a Julia project the user manages (juliapkg is then not used)."""
    environ = os.environ if environ is None else environ
    exe, _ = _option("PYTHON_JULIACALL_EXE", "juliacall-exe", environ)
    project, _ = _option("PYTHON_JULIACALL_PROJECT", "juliacall-project", environ)
    return bool(exe and project)


def _add_cuda_packages() -> None:
    """Add :data:`CUDA_PACKAGES` to juliapkg's requirements (its project's own juliapkg.json, so
    it stays for later processes); installed by the next resolve."""
    import juliapkg

    for name, (uuid, compat) in CUDA_PACKAGES.items():
        juliapkg.add(name, uuid, version=compat)


def _cuda_fixes() -> str:
    return (f"GPU support is opt-in: set {CUDA_ENV}=1 before the first julia solve of a new Python "
            "process, or run `python -c \"import pyode_bridge.backends.julia as j; "
            "j.install_cuda()\"` once (it installs CUDA.jl into the Julia environment; several "
            "minutes and a few GB). It cannot be added to a process in which Julia has already "
            "started (CUDA.jl's GPUCompiler/LLVM may clash with what is loaded).")


def install_cuda(environ=None) -> None:
    """Install GPU support (CUDA.jl) into the julia backend's Julia environment, once.

    Must run before Julia starts in this process (e.g. in a fresh ``python -c``); afterwards every
    process with that environment can use CUDA tensors. Equivalent: ``PYODE_BRIDGE_JULIA_CUDA=1``
    set before the first julia solve. Uses the same Julia as the backend (never downloads Julia
    without ``PYODE_BRIDGE_JULIA_DOWNLOAD=yes``) and needs network access for the packages.

    Raises:
        RuntimeError: Julia has already started in this process, or juliacall uses a Julia
            project you manage (``PYTHON_JULIACALL_PROJECT``): add CUDA to it yourself.
        BackendUnavailableError: no usable Julia (as for a solve).
    """
    environ = os.environ if environ is None else environ
    with _LOCK:
        if julia_started():
            raise RuntimeError("install_cuda() must run before Julia starts in the process; Julia "
                               "is already running here. " + _cuda_fixes())
        if _user_project(environ):
            uuid, compat = CUDA_PACKAGES["CUDA"]
            raise RuntimeError("juliacall uses the Julia project you manage (PYTHON_JULIACALL_EXE "
                               "and PYTHON_JULIACALL_PROJECT): add CUDA there yourself, "
                               f"`using Pkg; Pkg.add(name=\"CUDA\", version=\"{compat}\")`")
        found = preflight(environ)
        pin_executable(found, environ)
        _add_cuda_packages()
        import juliapkg

        juliapkg.resolve()


def load_cuda() -> None:
    """Load CUDA.jl so that PyodeBridge's CUDA extension is active (Julia must be running)."""
    with _LOCK:
        if _STATE["cuda"]:
            return
        host = _STATE["host"]
        if host is None:
            load_julia()
            host = _STATE["host"]
        try:
            host.seval("import CUDA")
        except Exception as e:  # noqa: BLE001
            raise BackendUnavailableError(
                'backend="julia" with CUDA tensors needs CUDA.jl, which is not in the Julia '
                f"environment (or did not load).\nCause: {type(e).__name__}: {e}\n" + _cuda_fixes()
            ) from e
        try:
            ok = bool(host.seval("Base.get_extension(PyodeBridge, :PyodeBridgeCUDAExt) !== nothing"))
        except Exception as e:  # noqa: BLE001
            raise unavailable_error("the CUDA extension of PyodeBridge did not load", e) from e
        if not ok:
            cause = RuntimeError("PyodeBridgeCUDAExt is not loaded after `import CUDA`")
            raise unavailable_error("the CUDA extension of PyodeBridge did not load", cause) from cause
        _STATE["cuda"] = True
