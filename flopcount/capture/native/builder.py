"""Building and loading the native extension so that no training process ever waits long for it.

This module finds the C++ sources (csrc/: ``SOURCES`` and ``HEADERS``), builds them into a cache keyed by everything that changes the
binary, loads it with a bounded wait, and answers `flopcount info` (``describe``) and
`flopcount build-native` (``build_now``). The one per-process cache of the loaded extension is the
package's (``flopcount.capture.native.load``). Set FLOPCOUNT_NATIVE=0 to never build or load it.

Layout of the cache (FLOPCOUNT_NATIVE_CACHE, default ~/.cache/flopcount/native):

  <tag>/flopcount_native.so   the library, complete: it appears by one atomic rename of a private
  <tag>/build.json            build directory, after the library loaded in the builder; never
                              written again, never overwritten
  <tag>.lock                  fcntl lock held by the one process building <tag> (the kernel releases
                              it when that process dies, however it dies); holds its pid and start
  <tag>.failed.json           why the last build failed (later processes do not retry it at every
                              start; ``flopcount build-native`` does)
  <tag>.log                   the builders' output
  .<tag>.tmp-<pid>/           a build in progress (a killed build's is removed by the next builder)

``<tag>`` is a digest of everything that changes the binary (``build_key``): the torch installation
(its real path, version, git revision, CUDA / ROCm version, C++ ABI), the compiler (real path and
version string), the flags, the text of every source and header and the Python ABI. Two environments with the same
torch version therefore never share, or rebuild, each other's library.

A training process that finds no library starts one detached builder process (unless a build is
already running) and waits for it at most FLOPCOUNT_NATIVE_WAIT seconds (default 10); past that
it goes on without the extension (the meter then uses the dispatch backend, saying why) and the
build finishes in the background for later processes. ``flopcount build-native`` builds in the
foreground (images, shared clusters). torch's own JIT lock file is never used in a shared directory.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

from .. import native as package  # the package's one cached loader (_load), read at use

EXTENSION = "flopcount_native"
# The extension's sources, by responsibility (csrc/native.h says what each holds).
SOURCES = ("observer.cpp", "keys.cpp", "hooks.cpp", "bindings.cpp")
HEADERS = ("native.h",)
MIN_TORCH = (2, 7)  # RecordFunction::overload_name; older torch uses the dispatch backend
BUILD_FLAGS = ["-O2", "-DNDEBUG"]  # NDEBUG: RecordFunction's layout must match libtorch's
CACHE_ENV = "FLOPCOUNT_NATIVE_CACHE"
WAIT_ENV = "FLOPCOUNT_NATIVE_WAIT"
DEFAULT_WAIT_S = 10.0
POLL_S = 0.1
# Environment variables of `flopcount run` that must not meter the builder process itself.
_RUN_VARS = ("FLOPCOUNT_RUN", "FLOPCOUNT_RUN_PARENT")


# ---- what the binary depends on ------------------------------------------------------------------

def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flopcount", "native")
    return Path(root)


def compiler() -> tuple[str, str]:
    """(real path, first line of --version) of the C++ compiler torch's JIT build uses (CXX or c++)."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        return name, "not found"
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        version = (result.stdout.strip().splitlines() or ["unknown"])[0]
    except (OSError, subprocess.SubprocessError):
        version = "unknown"
    return os.path.realpath(path), version


def source_digest(source: Path) -> str:
    """sha256 over the names and texts of the sources and headers in the directory ``source``."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        text = (source / name).read_bytes()
        digest.update(f"{name}\0{len(text)}\0".encode())
        digest.update(text)
    return digest.hexdigest()


def build_key(source: Path) -> dict:
    """Everything that changes the built library (the cache directory is a digest of it);
    ``source``: the directory of the C++ sources (``source_path``)."""
    compiler_path, compiler_version = compiler()
    return {
        "torch_path": os.path.realpath(os.path.dirname(torch.__file__)),
        "torch_version": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "compiler": compiler_path,
        "compiler_version": compiler_version,
        "flags": list(BUILD_FLAGS),
        "sources": list(SOURCES),
        "source_sha256": source_digest(source),
        "python_abi": sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag,
        "machine": platform.machine(),
    }


@dataclass(frozen=True)
class BuildPaths:
    """Where one build key's library, lock, failure record and log live."""
    root: Path
    tag: str

    @classmethod
    def for_key(cls, key: dict, root: Path | None = None) -> "BuildPaths":
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        version = key["torch_version"].replace("+", "_")
        return cls(root or cache_root(), f"torch{version}-{sys.implementation.cache_tag}-{digest}")

    @property
    def final(self) -> Path:
        return self.root / self.tag

    @property
    def library(self) -> Path:
        return self.final / f"{EXTENSION}.so"

    @property
    def record(self) -> Path:
        return self.final / "build.json"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.tag}.lock"

    @property
    def failed(self) -> Path:
        return self.root / f"{self.tag}.failed.json"

    @property
    def log(self) -> Path:
        return self.root / f"{self.tag}.log"

    def private_dir(self, pid: int) -> Path:
        return self.root / f".{self.tag}.tmp-{pid}"

    def stale_private_dirs(self) -> list[Path]:
        return sorted(self.root.glob(f".{self.tag}.tmp-*"))


def paths_for(source: Path) -> BuildPaths:
    return BuildPaths.for_key(build_key(source))


# ---- the lock: released by the kernel when its holder dies ----------------------------------------

class BuildLock:
    """An exclusive fcntl.flock on ``<tag>.lock``. The file's content names the holder (pid, since);
    it means something only while the lock is held (``holder``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self.fd = fd
        self.name_holder(os.getpid())
        return True

    @classmethod
    def inherited(cls, path: Path, fd: int) -> "BuildLock":
        """The lock a parent took and handed down (the descriptor shares its flock)."""
        lock = cls(path)
        fcntl.flock(fd, fcntl.LOCK_EX)  # already ours through the shared open file: returns at once
        lock.fd = fd
        return lock

    def name_holder(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": pid, "since": time.time(), "host": socket.gethostname()}).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def holder(paths: BuildPaths) -> dict | None:
    """{"pid", "since", "host"} of the process building ``paths`` now, or None when none is."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: read who holds it
            try:
                info = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:  # the holder is writing it right now
                info = {}
            return {"pid": info.get("pid"), "since": info.get("since"), "host": info.get("host")}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ---- building --------------------------------------------------------------------------------------

def failure(paths: BuildPaths) -> dict | None:
    try:
        return json.loads(paths.failed.read_text())
    except (OSError, ValueError):
        return None


def build(source: Path, paths: BuildPaths, lock: BuildLock | None = None) -> str | None:
    """Build ``paths.library`` unless it exists: None when it is there afterwards, else one line why.

    Holds the build lock throughout (``lock``: one already held, else it waits for the lock).
    Builds in a private directory, loads the library there (a library that does not load is a
    failed build), then renames the directory into place."""
    if lock is None:
        lock = BuildLock(paths.lock)
        lock.acquire(blocking=True)
    try:
        if paths.library.is_file():
            return None
        for stale in paths.stale_private_dirs():  # killed builds (torch's `lock` file inside is theirs)
            shutil.rmtree(stale, ignore_errors=True)
        paths.failed.unlink(missing_ok=True)
        private = paths.private_dir(os.getpid())
        private.mkdir(parents=True)
        started = time.time()
        try:
            _compile(source, private)
            for item in private.iterdir():  # objects and build.ninja name the private dir
                if item.name != paths.library.name:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            record = {"key": build_key(source), "built": time.time(), "seconds": round(time.time() - started, 1),
                      "pid": os.getpid(), "host": socket.gethostname()}
            (private / paths.record.name).write_text(json.dumps(record, indent=1) + "\n")
            os.rename(private, paths.final)  # atomic; fails, rather than overwrite, if it exists
            return None
        except Exception as exc:  # no compiler, no ninja, incompatible headers, full disk, ...
            shutil.rmtree(private, ignore_errors=True)
            if paths.library.is_file():  # cannot happen under the lock, but never lose a good library
                return None
            why = _one_line(exc)
            _append_log(paths, f"build failed ({time.strftime('%Y-%m-%d %H:%M:%S')}): {exc}\n")
            _write_json(paths.failed, {"why": why, "when": time.time(), "pid": os.getpid(), "log": str(paths.log)})
            return why
    finally:
        lock.release()


def _compile(source: Path, directory: Path) -> None:
    from torch.utils.cpp_extension import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load(name=EXTENSION, sources=[str(source / name) for name in SOURCES], extra_cflags=BUILD_FLAGS, build_directory=str(directory),
             verbose=False)


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror:", line)]  # the compiler's diagnostic
    line = (errors or lines or [""])[0]
    return f"{type(exc).__name__}: {line[:300]}"


def _append_log(paths: BuildPaths, text: str) -> None:
    try:
        with open(paths.log, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError:
        pass


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def start_background_build(paths: BuildPaths) -> subprocess.Popen | None:
    """Take the build lock and hand it to one detached builder process (its own session: Ctrl-C
    and the job's exit leave it running); None when another process holds the lock. Only the
    process that gets the lock starts a builder, so the ranks of a job start one between them."""
    lock = BuildLock(paths.lock)
    if not lock.acquire(blocking=False):
        return None
    try:
        if paths.library.is_file():  # finished just now
            return None
        env = {k: v for k, v in os.environ.items() if k not in _RUN_VARS}
        package_root = str(Path(__file__).resolve().parents[3])
        code = (f"import sys; sys.path.insert(0, {package_root!r}); "
                f"from flopcount.capture.native.builder import background_main; sys.exit(background_main({lock.fd}))")
        with open(paths.log, "ab") as log:
            builder = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(lock.fd,))
        lock.name_holder(builder.pid)
        return builder
    finally:
        lock.release()  # our copy; the builder's inherited descriptor keeps the lock until it ends


def background_main(lock_fd: int) -> int:
    """Entry of the builder process started by ``start_background_build``."""
    source = source_path()
    if source is None:
        return 1
    paths = paths_for(source)
    lock = BuildLock.inherited(paths.lock, lock_fd)
    _append_log(paths, f"background build by pid {os.getpid()} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    return 0 if build(source, paths, lock) is None else 1


# ---- loading with a bounded wait -------------------------------------------------------------------

def wait_bound() -> float:
    """FLOPCOUNT_NATIVE_WAIT in seconds (default 10); ValueError with one line when it is not one."""
    text = os.environ.get(WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{WAIT_ENV}={text!r} is not a number of seconds (>= 0)")
    return value


def import_library(paths: BuildPaths):
    spec = importlib.util.spec_from_file_location(EXTENSION, paths.library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(source: Path, wait: float):
    """(module, None), or (None, one line why not). Never waits longer than ``wait`` seconds for a
    build: without a library it starts a background build (unless one runs) and waits for it."""
    paths = paths_for(source)
    if not paths.library.is_file():
        why = _wait_for_build(paths, wait)
        if why is not None:
            return None, why
    try:
        return import_library(paths), None
    except Exception as exc:  # e.g. a library built for another libstdc++
        return None, (f"the library {paths.library} does not load ({_one_line(exc)}); remove {paths.final} "
                      f"and run `flopcount build-native`")


def _wait_for_build(paths: BuildPaths, wait: float) -> str | None:
    failed = failure(paths)
    if failed is not None:
        return _failed_line(paths, failed)
    builder = start_background_build(paths)  # None: another process builds it
    deadline = time.monotonic() + wait
    while not paths.library.is_file():
        exited = builder is not None and builder.poll() is not None
        if exited or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    if paths.library.is_file():
        return None
    failed = failure(paths)
    if failed is not None:
        return _failed_line(paths, failed)
    if builder is not None and builder.poll() not in (None, 0):
        return f"its build process exited with status {builder.returncode} (see {paths.log})"
    return (f"the native extension is being built ({building_line(paths)}); waited {wait:g} s "
            f"({WAIT_ENV}); later processes will use it, or run `flopcount build-native` first")


def _failed_line(paths: BuildPaths, failed: dict) -> str:
    return (f"the native extension did not build: {failed.get('why')} (log: {paths.log}; "
            f"`flopcount build-native` retries)")


def building_line(paths: BuildPaths) -> str:
    """'by pid P since T' of the running build ('by pid P on HOST since T' from another node)."""
    who = holder(paths) or {}
    since = who.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "now"
    host = who.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""  # a cache shared by nodes
    return f"by pid {who.get('pid') or '?'}{where} since {when}"


def state(source: Path) -> dict:
    """The build state of this environment's key, without building anything (``flopcount info``):
    {"state": built | building | failed | not built, "detail": one line, "build_dir": ...}."""
    paths = paths_for(source)
    out = {"build_dir": str(paths.final)}
    if paths.library.is_file():
        return {"state": "built", "detail": str(paths.library), **out}
    if holder(paths) is not None:
        return {"state": "building", "detail": f"building {building_line(paths)}", **out}
    failed = failure(paths)
    if failed is not None:
        return {"state": "failed", "detail": f"failed: {failed.get('why')} (log: {paths.log})", **out}
    return {"state": "not built", "detail": "not built (the first metered process builds it in the background; "
                                            "`flopcount build-native` builds it now)", **out}


# ---- the source, loading, `flopcount info` and `flopcount build-native` -----------------------------

def source_path() -> Path | None:
    """The directory of the C++ sources: csrc/ of a source checkout, or the copy installed inside
    the package; None when either lacks one of them."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "csrc", here.parents[1] / "csrc"):
        if all((candidate / name).is_file() for name in (*SOURCES, *HEADERS)):
            return candidate
    return None


def cache_dir(source: Path) -> Path:
    """This environment's build directory (BuildPaths: keyed by torch installation,
    compiler, flags, source and Python ABI)."""
    return paths_for(source).final


def unsupported() -> str | None:
    """Why the extension is never built here (disabled, torch too old, no source), else None."""
    if os.environ.get("FLOPCOUNT_NATIVE", "").strip() == "0":
        return "disabled by FLOPCOUNT_NATIVE=0"
    if TorchVersion(torch.__version__) < MIN_TORCH:
        return (f"it needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                f"(RecordFunction::overload_name); this is torch {torch.__version__}")
    if source_path() is None:
        return f"the C++ sources ({', '.join((*SOURCES, *HEADERS))}) are not installed"
    return None


def extension():
    """(extension module, None) or (None, why it is not available); waits for a build at most
    FLOPCOUNT_NATIVE_WAIT seconds (a background build goes on for later processes). Uncached: the
    package's ``_load`` calls it once per process."""
    why = unsupported()
    if why is not None:
        return None, why
    try:
        return load(source_path(), wait_bound())
    except Exception as exc:  # an unreadable cache dir, a bad FLOPCOUNT_NATIVE_WAIT, ...
        return None, f"the native extension is not available: {_one_line(exc)}"


def build_state() -> dict:
    """{"state", "detail", "build_dir"} without building (``state``); state is one of
    built, building, failed, not built, disabled (or unsupported: detail says why)."""
    why = unsupported()
    if why is not None:
        kind = "disabled" if why.startswith("disabled") else "unsupported"
        return {"state": kind, "detail": why if kind == "unsupported" else "disabled (FLOPCOUNT_NATIVE=0)",
                "build_dir": None}
    try:
        return state(source_path())
    except Exception as exc:
        return {"state": "unsupported", "detail": _one_line(exc), "build_dir": None}


def describe() -> dict:
    """Versions, the backend that backend='auto' picks, and the extension's build state
    (``flopcount info``). Loads a built extension; never starts or waits for a build."""
    from ... import __version__

    source = source_path()
    state = build_state()
    loadable = state["state"] in ("built", "disabled", "unsupported")
    module, error = package._load() if loadable else (None, state["detail"])
    if state["state"] == "built" and module is None:
        state = {**state, "state": "failed", "detail": f"failed: {error}"}
    return {
        "flopcount": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "active_backend": "native" if module is not None else "dispatch",
        "native_extension": "built" if module is not None else state["detail"],
        "native_state": state["state"],
        "native_error": error if state["state"] in ("failed", "unsupported") else None,
        "native_source": str(source) if source else None,
        "native_build_dir": state["build_dir"],
        "native_module": str(paths_for(source).library) if module is not None and source else None,
    }


def _held_lock(paths: BuildPaths, wait: float | None) -> BuildLock | None:
    """The build lock of ``paths``, held; None when another process held it ``wait`` seconds."""
    lock = BuildLock(paths.lock)
    if lock.acquire(blocking=False):
        return lock
    print(f"flopcount: waiting for the build {building_line(paths)}"
          + (f" (at most {wait:g} s)" if wait is not None else ""), file=sys.stderr)
    if wait is None:
        lock.acquire(blocking=True)
        return lock
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        if lock.acquire(blocking=False):
            return lock
    return None


def build_now(wait: float | None = None) -> int:
    """Build the extension now, waiting for a build another process runs (``flopcount build-native``,
    ``make setup``): at most ``wait`` seconds (None: as long as it takes), then one line naming the
    lock and its holder. 0 when it loads, 1 otherwise."""
    why = unsupported()
    if why is None:
        source = source_path()
        try:
            paths = paths_for(source)
            lock = None
            if not paths.library.is_file():
                if holder(paths) is not None or wait is not None:
                    lock = _held_lock(paths, wait)
                    if lock is None:
                        print(f"flopcount: the native build lock {paths.lock} is still held {building_line(paths)} "
                              f"after {wait:g} s (--wait); let that build finish and run `flopcount build-native` "
                              f"again, or stop that process if it is stuck", file=sys.stderr)
                        return 1
                if not paths.library.is_file():
                    print(f"flopcount: building the native extension into {paths.final} (about a minute)",
                          file=sys.stderr)
            why = build(source, paths, lock)  # releases the lock
        except Exception as exc:  # an unwritable cache dir, a full disk, ...
            why = _one_line(exc)
        package._load.cache_clear()
        why = why or package.load_error()
    if why:
        print(f"flopcount: native backend unavailable ({why}); the dispatch backend will be used",
              file=sys.stderr)
        return 1
    # The library is loaded from its private build dir before that is renamed into place: name
    # where it lives now, not the module's (stale) __file__.
    print(f"flopcount: native extension ready: {paths_for(source_path()).library}")
    return 0
