"""The native build never blocks training (capture/native/builder.py), with real processes: a build
killed part-way, a metered job that goes on within the wait bound, two environments sharing one
cache without rebuilding each other's library, and `flopcount info` / `flopcount build-native`."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flopcount.capture import native, native_build

ROOT = Path(__file__).resolve().parents[1]
SITE_PACKAGES = Path(torch.__file__).resolve().parents[1]
M, K, N, STEPS = 16, 8, 4, 3
# Forward x @ W.T [M,K]x[K,N] and, in backward, the weight gradient [N,M]x[M,K] (the input needs no
# gradient): 2*M*K*N FLOP each, per step.
MATMUL_FLOPS = STEPS * 2 * (2 * M * K * N)

JOB = f"""
import json, time, warnings
import torch, flopcount
model = torch.nn.Linear({K}, {N}, bias=False)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
start = time.monotonic()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with flopcount.meter(backend="auto") as m:
        entered_s = time.monotonic() - start
        for _ in range({STEPS}):
            model(torch.randn({M}, {K})).sum().backward()
            opt.step()
            opt.zero_grad()
s = m.summary()
print(json.dumps({{"backend": m.backend, "entered_s": entered_s, "matmul": s["by_category"].get("matmul"),
                  "steps": s["steps"], "torch": torch.__file__,
                  "warnings": [str(w.message) for w in caught if "flopcount" in str(w.message)]}}))
"""

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None,
    reason="no C++ compiler or ninja: the native extension cannot be built here")


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOPCOUNT_")}
    env.update(FLOPCOUNT_NATIVE_CACHE=str(cache), PYTHONPATH=str(ROOT),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]), **extra)
    return env


def _paths(cache: Path, torch_path: Path | None = None) -> native_build.BuildPaths:
    key = native_build.build_key(native.source_path())
    if torch_path is not None:
        key["torch_path"] = str(torch_path.resolve())
    return native_build.BuildPaths.for_key(key, root=cache)


def _job(python: str, env: dict, tmp_path: Path) -> dict:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    result = subprocess.run([python, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a build this test started in its own session;
    ninja puts each compiler in a process group of its own, so killing one group leaves them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_builder(paths: native_build.BuildPaths) -> None:
    """Stop a background build the test's jobs started (a session of its own: sid == pid)."""
    who = native_build.holder(paths)
    if who and who.get("pid"):
        _kill_session(int(who["pid"]))


def test_killed_build_then_metered_job_goes_on_within_the_wait_bound(tmp_path):
    cache = tmp_path / "cache"
    env = _env(cache)
    paths = _paths(cache)
    build = subprocess.Popen([sys.executable, "-m", "flopcount.cli", "build-native"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # torch has written its lock file and build.ninja in the private dir: the compiler runs now.
        private = _wait_for(lambda: [d for d in paths.stale_private_dirs() if (d / "build.ninja").is_file()],
                            240, "the build to start compiling")[0]
        time.sleep(1.0)
        assert build.poll() is None, "the build finished before it could be killed"
        os.killpg(build.pid, signal.SIGKILL)  # the builder and ninja (each compiler has a group of its own)
        build.wait(timeout=30)
        assert (private / "lock").exists()  # torch's lock file, left behind: nobody waits on it
        assert not paths.library.exists() and native_build.holder(paths) is None

        job = _job(sys.executable, _env(cache, FLOPCOUNT_NATIVE_WAIT="3"), tmp_path)
        assert job["backend"] == "dispatch"
        assert job["matmul"] == MATMUL_FLOPS and job["steps"] == STEPS
        # Bounded: 3 s of waiting, not the 50+ s build (nor forever, as behind torch's lock file).
        assert job["entered_s"] < 30, job
        assert len(job["warnings"]) == 1, job["warnings"]
        assert "is being built (by pid" in job["warnings"][0] and "FLOPCOUNT_NATIVE_WAIT" in job["warnings"][0]

        # The job left a background build running for later processes, which cleared the killed one.
        who = _wait_for(lambda: native_build.holder(paths), 60, "the background build to take the lock")
        assert who["pid"] not in (build.pid, None)
        _wait_for(lambda: not private.exists(), 60, "the killed build's directory to be removed")
        info = subprocess.run([sys.executable, "-m", "flopcount.cli", "info", "--json"], env=env,
                              capture_output=True, text=True, timeout=120)
        facts = json.loads(info.stdout)
        assert facts["native_state"] == "building" and facts["active_backend"] == "dispatch"
        assert facts["native_extension"].startswith(f"building by pid {who['pid']} since ")
    finally:
        _kill_session(build.pid)  # the killed build's compiler may still run
        _kill_builder(paths)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from flopcount.capture.native_build import BuildLock
assert BuildLock(Path(sys.argv[1])).acquire(blocking=False)
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_held_by_a_live_process_bounds_the_wait_and_a_dead_holders_lock_is_stale(tmp_path):
    """A process that holds the build lock and never builds (hung, stopped): a metered job waits
    FLOPCOUNT_NATIVE_WAIT seconds, not forever, falls back to dispatch with one warning that names
    the holder, and starts no second build. Once the holder is killed, its lock file (naming its
    pid) is left behind and means nothing: the kernel released the flock."""
    cache = tmp_path / "cache"
    env = _env(cache)
    paths = _paths(cache)
    paths.lock.parent.mkdir(parents=True)
    hold = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(paths.lock)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert hold.stdout.readline().strip() == "held"
        assert native_build.holder(paths)["pid"] == hold.pid
        job = _job(sys.executable, _env(cache, FLOPCOUNT_NATIVE_WAIT="1"), tmp_path)
        assert job["backend"] == "dispatch"
        assert job["matmul"] == MATMUL_FLOPS and job["steps"] == STEPS
        assert job["entered_s"] < 30, job  # the 1 s bound plus start-up, never the holder's 600 s
        assert len(job["warnings"]) == 1, job["warnings"]
        assert f"is being built (by pid {hold.pid} since " in job["warnings"][0], job["warnings"]
        assert "FLOPCOUNT_NATIVE_WAIT" in job["warnings"][0]
        assert native_build.holder(paths)["pid"] == hold.pid and not paths.stale_private_dirs()  # no 2nd build
    finally:
        hold.kill()
        hold.wait(timeout=30)
    assert json.loads(paths.lock.read_text())["pid"] == hold.pid  # the dead holder's file stays...
    assert native_build.holder(paths) is None  # ...and is stale: nobody holds the lock
    info = subprocess.run([sys.executable, "-m", "flopcount.cli", "info", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(info.stdout)["native_state"] == "not built", info.stdout


def _venv_with_own_torch(where: Path) -> str:
    """A virtual environment with its own torch installation (the same version as ours, hard-linked
    files at another path: what two venvs on one machine have); other packages come from ours."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = str(where / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for name in ["torch", "torchgen", "functorch", f"torch-{torch.__version__}.dist-info"]:
        if (SITE_PACKAGES / name).exists():
            try:
                shutil.copytree(SITE_PACKAGES / name, site / name, copy_function=os.link)
            except OSError:  # another file system: a real copy
                shutil.rmtree(site / name, ignore_errors=True)
                shutil.copytree(SITE_PACKAGES / name, site / name)
    (site / "shared-deps.pth").write_text(str(SITE_PACKAGES) + "\n")  # after its own site-packages
    return python


def _torch_dir(python: str, env: dict) -> Path:
    code = "import os, torch; print(os.path.dirname(os.path.realpath(torch.__file__)))"
    return Path(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=env,
                               timeout=120).stdout.strip())


def test_two_environments_share_a_cache_without_rebuilding_each_other(tmp_path):
    cache = tmp_path / "cache"
    env = _env(cache)
    envs = tmp_path / "envs"
    paths_b = None
    try:
        python_a, python_b = (_venv_with_own_torch(envs / name) for name in ("a", "b"))
        torch_a, torch_b = _torch_dir(python_a, env), _torch_dir(python_b, env)
        assert len({torch_a, torch_b, Path(torch.__file__).parent.resolve()}) == 3  # three installations
        paths_a, paths_b = _paths(cache, torch_a), _paths(cache, torch_b)
        assert paths_a.final != paths_b.final

        built = subprocess.run([python_a, "-m", "flopcount.cli", "build-native"], env=env, capture_output=True,
                               text=True, timeout=900)
        assert built.returncode == 0, built.stderr
        assert json.loads(paths_a.record.read_text())["key"]["torch_path"] == str(torch_a)
        before = paths_a.library.stat()

        # Environment B starts a metered job: its own key, its own (background) build; A's is untouched.
        job_b = _job(python_b, _env(cache, FLOPCOUNT_NATIVE_WAIT="0"), tmp_path)
        assert job_b["torch"].startswith(str(torch_b)) and job_b["backend"] == "dispatch"
        assert job_b["matmul"] == MATMUL_FLOPS
        _wait_for(lambda: native_build.holder(paths_b), 60, "B's build to start")

        # Third start, in A again, while B builds: A's library loads at once (no wait allowed), not rebuilt.
        job_a = _job(python_a, _env(cache, FLOPCOUNT_NATIVE_WAIT="0"), tmp_path)
        assert job_a["torch"].startswith(str(torch_a))
        assert job_a["backend"] == "native" and job_a["warnings"] == []
        assert job_a["matmul"] == MATMUL_FLOPS and job_a["steps"] == STEPS
        after = paths_a.library.stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
        assert native_build.holder(paths_a) is None and not paths_a.stale_private_dirs()
    finally:
        if paths_b is not None:
            _kill_builder(paths_b)
        shutil.rmtree(envs, ignore_errors=True)


def test_failed_build_is_recorded_once_then_jobs_fall_back_at_once(tmp_path):
    """A compiler that fails: `flopcount build-native` exits 1 with the reason, `flopcount info`
    says `failed: ...`, and a metered job falls back to dispatch without building again (a failed
    build is retried by build-native only, not at every process start)."""
    cache = tmp_path / "cache"
    failing = tmp_path / "bin"
    failing.mkdir()
    (failing / "c++").write_text('#!/bin/sh\n[ "$1" = --version ] && echo "c++ (fake) 12.2.0" && exit 0\n'
                                 'echo "x.cpp:1:1: error: this compiler always fails" >&2\nexit 1\n')
    (failing / "c++").chmod(0o755)
    env = _env(cache, CXX=str(failing / "c++"))
    built = subprocess.run([sys.executable, "-m", "flopcount.cli", "build-native"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 1
    assert "error: this compiler always fails" in built.stderr.splitlines()[-1]
    info = json.loads(subprocess.run([sys.executable, "-m", "flopcount.cli", "info", "--json"], env=env,
                                     capture_output=True, text=True, timeout=120).stdout)
    assert info["native_state"] == "failed" and info["active_backend"] == "dispatch"
    assert info["native_extension"].startswith("failed: ") and "this compiler always fails" in info["native_extension"]
    log = next(cache.glob("*.log"))
    size = log.stat().st_size

    job = _job(sys.executable, _env(cache, CXX=str(failing / "c++"), FLOPCOUNT_NATIVE_WAIT="60"), tmp_path)
    assert job["backend"] == "dispatch" and job["matmul"] == MATMUL_FLOPS
    assert job["entered_s"] < 30  # no wait for a build: none was started
    assert len(job["warnings"]) == 1, job["warnings"]
    assert "did not build" in job["warnings"][0] and "build-native` retries" in job["warnings"][0]
    assert log.stat().st_size == size and not list(cache.glob(".*.tmp-*"))


def test_info_says_disabled(tmp_path):
    env = _env(tmp_path / "cache", FLOPCOUNT_NATIVE="0")
    info = json.loads(subprocess.run([sys.executable, "-m", "flopcount.cli", "info", "--json"], env=env,
                                     capture_output=True, text=True, timeout=120).stdout)
    assert info["native_state"] == "disabled" and info["active_backend"] == "dispatch"
    assert info["native_extension"] == "disabled (FLOPCOUNT_NATIVE=0)"
    assert not (tmp_path / "cache").exists()  # nothing built, nothing created
