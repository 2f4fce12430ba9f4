"""Storage faults never reach the training loop (trace/spool.py): a real small tmpfs that fills
mid-run under a real training process, read-only and file `out`s for flopcount.meter and
`flopcount run`. Mounting needs root: skipped cleanly elsewhere."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import warnings
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flopcount
from flopcount.trace.spool import PendingPart, Spool, StorageWarning, merge_ranges, max_unwritten_steps
from flopcount.trace.storage import TraceError

ROOT = Path(__file__).resolve().parents[1]
M, K, N = 16, 8, 4
# Per step: forward [M,K]x[K,N] and the weight gradient [N,M]x[M,K] (the input needs none).
MATMUL_PER_STEP = 2 * (2 * M * K * N)

TRAIN = f"""
import json, os, sys, warnings
import torch, flopcount
out, filler, fill_at, free_at, steps, flush_every = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])

def fill(path):  # write until the file system is full
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError as e:
        assert e.errno == 28, e
    finally:
        os.close(fd)

model = torch.nn.Linear({K}, {N}, bias=False)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with flopcount.meter(out=out, backend="dispatch", flush_every=flush_every) as m:
        for step in range(steps):
            if step == fill_at:
                fill(filler)
            if step == free_at:
                os.remove(filler)
            model(torch.randn({M}, {K})).sum().backward()
            opt.step()
            opt.zero_grad()
            m.step()
print(json.dumps({{"steps": m.summary()["steps"], "warnings": [str(w.message) for w in caught]}}))
"""


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs directory, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size: str = "1m", read_only: bool = False) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOPCOUNT_RUN")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _train(tmp_path: Path, out: Path, filler: Path, *, fill_at: int, free_at: int, steps: int,
           flush_every: int) -> dict:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    command = [sys.executable, str(script), str(out), str(filler), str(fill_at), str(free_at), str(steps),
               str(flush_every)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr  # the training finished despite the full disk
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The `flopcount` command line, run in this process (it reads the traces the subprocess wrote)."""
    from flopcount.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["flopcount", *args], code, out.getvalue(), err.getvalue())


def _storage_warnings(job: dict) -> list[str]:
    return [w for w in job["warnings"] if w.startswith("flopcount:")]


def test_disk_full_mid_run_drops_the_oldest_steps_past_the_bound_and_reports_exactly_those(tmp_path, tmpfs):
    mount = tmpfs("1m")
    out, flush_every, steps = mount / "trace", 100, 1300
    bound = max_unwritten_steps(flush_every)
    assert bound == 1000
    # Parts [0-99], [100-199] are written; the disk fills before step 250; at the flush after
    # step 1299 the spool holds the newest 1000 steps (300-1299), so 200-299 were dropped; the
    # space comes back at step 1250, before that last flush, which writes all 1000.
    job = _train(tmp_path, out, mount / "filler", fill_at=250, free_at=1250, steps=steps, flush_every=flush_every)
    assert job["steps"] == steps  # the meter's own totals are complete
    warnings = _storage_warnings(job)
    full = [w for w in warnings if "cannot write the trace" in w]
    assert len(full) == 1 and "ENOSPC" in full[0] and str(out) in full[0], warnings
    assert "100 step(s) not yet written" in full[0]
    assert sum("dropping the oldest" in w for w in warnings) == 1
    lost = [w for w in warnings if "close entry records them" in w]
    assert len(lost) == 1 and "steps 200-299 of rank 0" in lost[0], warnings

    summary = _cli("summarize", str(out), "--json")
    assert summary.returncode == 1, summary.stderr  # a finding
    assert "steps 200-299 of segment 0 could not be written" in summary.stderr
    facts = json.loads(summary.stdout)
    assert facts["steps"] == steps - 100
    assert facts["by_category"]["matmul"] == (steps - 100) * MATMUL_PER_STEP
    verify = _cli("verify", str(out))
    assert verify.returncode == 1 and "steps 200-299 of segment 0 could not be written" in verify.stdout, verify.stdout
    close = [json.loads(line) for line in (out / "manifest" / "r00000.jsonl").read_text().splitlines()][-1]
    assert close["type"] == "close" and close["unwritten"] == [[200, 299]]


def test_disk_full_then_freed_before_exit_writes_everything(tmp_path, tmpfs):
    mount = tmpfs("1m")
    out = mount / "trace"
    job = _train(tmp_path, out, mount / "filler", fill_at=25, free_at=60, steps=100, flush_every=10)
    warnings = _storage_warnings(job)
    assert len(warnings) == 1 and "ENOSPC" in warnings[0] and "10 step(s) not yet written" in warnings[0], warnings
    verify = _cli("verify", str(out))
    assert verify.returncode == 0, verify.stdout
    summary = _cli("summarize", str(out), "--json")
    assert summary.returncode == 0, summary.stderr
    facts = json.loads(summary.stdout)
    assert facts["steps"] == 100 and facts["by_category"]["matmul"] == 100 * MATMUL_PER_STEP


def test_disk_still_full_at_exit_the_missing_close_is_the_finding(tmp_path, tmpfs):
    mount = tmpfs("1m")
    out = mount / "trace"
    job = _train(tmp_path, out, mount / "filler", fill_at=25, free_at=-1, steps=60, flush_every=10)
    lost = [w for w in _storage_warnings(job) if "close entry" in w]
    assert len(lost) == 1 and "steps 20-59 and the close entry of rank 0 could not be written" in lost[0], lost
    summary = _cli("summarize", str(out), "--json")
    assert summary.returncode == 1 and "did not close its trace" in summary.stderr, summary.stderr
    assert json.loads(summary.stdout)["steps"] == 20  # the committed parts still count


@pytest.fixture
def bad_outs(tmp_path, tmpfs):
    """A read-only file system and a path naming a regular file."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    return {"read-only": (tmpfs("64k", read_only=True), "Read-only file system"), "file": (a_file, "a file")}


@pytest.mark.parametrize("kind", ["read-only", "file"])
def test_meter_refuses_an_unwritable_out_before_training(bad_outs, kind):
    out, reason = bad_outs[kind]
    trained = []
    model = torch.nn.Linear(K, N)
    with pytest.raises(TraceError) as raised:
        with flopcount.meter(out=out, backend="dispatch"):
            trained.append(model(torch.randn(M, K)))
    message = str(raised.value)
    assert trained == [] and "\n" not in message
    assert message.startswith(f"flopcount: cannot write traces to {out}: ") and reason in message


@pytest.mark.parametrize("kind", ["read-only", "file"])
def test_run_refuses_an_unwritable_out_before_the_command_starts(bad_outs, kind, tmp_path):
    out, reason = bad_outs[kind]
    marker = tmp_path / "command-ran"
    result = _cli("run", "--out", str(out), "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert result.returncode == 2
    assert not marker.exists()  # the command never started
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flopcount: cannot write traces to {out}: ")
    assert reason in lines[0] and "Traceback" not in result.stderr


def test_spool_holds_the_newest_steps_within_the_bound_and_retries_oldest_first():
    """The spool's own rules, without a file system (the tmpfs tests above run them for real):
    bound max(1000, 10 x flush_every), oldest parts dropped first, one warning per kind."""
    assert [max_unwritten_steps(n) for n in (1, 50, 100, 250)] == [1000, 1000, 1000, 2500]
    assert merge_ranges([[30, 39], [0, 9], [10, 19], [50, 59]]) == [[0, 19], [30, 39], [50, 59]]
    written, down = [], [errno.ENOSPC]

    def commit(part):
        if down:
            raise OSError(down[0], os.strerror(down[0]), "/data/trace/steps/r00000-000003.parquet.tmp-7")
        written.append((part.first_step, part.last_step))

    spool = Spool(commit, max_unwritten_steps(100), "/data/trace")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for first in range(0, 1300, 100):  # 13 parts of 100 steps, none written
            spool.add(PendingPart(first, first + 99, 100))
            assert not spool.drain()
        down[:] = [errno.EROFS]
        assert not spool.drain()
        down.clear()
        assert spool.drain()
    assert written == [(first, first + 99) for first in range(300, 1300, 100)]  # oldest first
    assert spool.unwritten() == [[0, 299]] and not spool.pending
    messages = [str(w.message) for w in caught if issubclass(w.category, StorageWarning)]
    assert len(messages) == 3  # ENOSPC once, dropping once, EROFS once
    assert "/data/trace/steps/r00000-000003.parquet (ENOSPC" in messages[0]
    assert "100 step(s) not yet written" in messages[0]
    assert "dropping the oldest" in messages[1] and "steps 0-99 first" in messages[1]
    assert "(EROFS" in messages[2] and "1000 step(s) not yet written" in messages[2]
