"""`flopcount build-native` waits for another process's build lock at most --wait seconds, then
exits 1 with one line naming the lock file, its holder and what to do (real processes: a live
holder of the fcntl lock, as a build that hangs would be)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from flopcount.capture import native_build

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": time.time(), "host": socket.gethostname()}).encode(), 0)
    print("held", flush=True)
    time.sleep(600)
""")


def test_build_native_gives_up_on_a_held_lock_after_its_wait_bound(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOPCOUNT_")}
    env.update(FLOPCOUNT_NATIVE_CACHE=str(cache), PYTHONPATH=str(ROOT))
    paths = native_build.BuildPaths.for_key(native_build.build_key(native_build.source_path()), root=cache)
    paths.lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(paths.lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([sys.executable, "-m", "flopcount.cli", "build-native", "--wait", "1"], env=env,
                                capture_output=True, text=True, timeout=120)  # bounded: the holder holds it 600 s
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert lines[0].startswith(f"flopcount: waiting for the build by pid {holder.pid} since ")
        assert len(lines) == 2 and lines[1].startswith(f"flopcount: the native build lock {paths.lock} is still "
                                                       f"held by pid {holder.pid} since "), lines
        assert "after 1 s (--wait)" in lines[1] and "run `flopcount build-native` again" in lines[1]
        assert holder.poll() is None and not paths.library.exists()  # nothing built, the holder untouched
    finally:
        holder.kill()
        holder.wait()
