"""One writer per (trace dir, rank, process): real concurrent processes, a SIGKILLed holder, and
the object-store lease on fsspec's memory:// filesystem."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import flopcount
from flopcount.trace import lease
from flopcount.trace import manifest as mf
from flopcount.trace.storage import open_storage
from tracegen import MATMUL_PER_STEP, train

HOLDER = textwrap.dedent("""
    import sys, torch, flopcount
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=sys.argv[1], backend="dispatch", flush_every=1) as m:
        for _ in range(2):
            layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
            m.step()
        print("holding", flush=True)
        sys.stdin.readline()  # hold the lease until the test says go (or kills us)
""")


def start_holder(tmp_path, out):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    child = subprocess.Popen([sys.executable, str(script), str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "holding"
    return child


def test_a_second_writer_on_the_same_rank_fails_at_entry_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    child = start_holder(tmp_path, out)
    try:
        meter = flopcount.meter(out=out, backend="dispatch")
        with pytest.raises(lease.LeaseHeld) as error:
            meter.__enter__()
        message = str(error.value)
        assert message.startswith("flopcount: ") and "\n" not in message
        assert f"pid {child.pid} on host {socket.gethostname()}" in message
        assert "another out= directory" in message
        assert not meter._active  # nothing was installed: training never started under it
    finally:
        child.communicate("go\n", timeout=60)
    assert child.returncode == 0
    train(out, steps=3)  # the holder is gone: the resume takes the lease
    entries = mf.parse((out / "manifest" / "r00000.jsonl").read_bytes(), "m")
    assert [e["type"] for e in entries] == ["segment", "part", "part", "close", "segment", "part", "close"]
    assert entries[4]["takeover"] is None  # released cleanly: nothing taken over
    summary = flopcount.summarize(out)
    assert summary["by_category"]["matmul"] == 5 * MATMUL_PER_STEP and summary["rank_problems"] == []


def test_a_second_meter_in_the_same_process_fails_too(tmp_path):
    with flopcount.meter(out=tmp_path / "run", backend="dispatch"):
        with pytest.raises(lease.LeaseHeld, match="another meter in this process"):
            flopcount.meter(out=tmp_path / "run", backend="dispatch").__enter__()
    train(tmp_path / "run", steps=1)  # released at exit


def test_a_lease_left_by_a_killed_writer_is_taken_over_and_recorded(tmp_path):
    out = tmp_path / "run"
    child = start_holder(tmp_path, out)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    holder = json.loads((out / "lease" / "r00000.lease").read_text())
    assert holder["pid"] == child.pid  # the dead writer's lease is still there...
    (out / "steps" / "r00000-000007.parquet.tmp-4242").write_bytes(b"torn")  # and a temp file it left
    (out / "manifest" / "r00000.jsonl.tmp-4242").write_bytes(b"torn")
    assert flopcount.summarize(out)["by_category"]["matmul"] == 2 * MATMUL_PER_STEP  # readers ignore temp files
    train(out, steps=1)  # ...but its lock died with it
    entries = mf.parse((out / "manifest" / "r00000.jsonl").read_bytes(), "m")
    resumed = [e for e in entries if e["type"] == "segment"][1]
    assert resumed["takeover"]["pid"] == child.pid and resumed["takeover"]["host"] == socket.gethostname()
    assert resumed["pid"] == os.getpid()
    assert not [n for d in ("steps", "manifest") for n in os.listdir(out / d) if ".tmp-" in n]
    assert (out / "lease" / "r00000.lease").read_text() == ""  # released at close


def test_object_store_lease_is_exclusive_expires_and_is_taken_over():
    pytest.importorskip("fsspec")
    import fsspec

    memory = fsspec.filesystem("memory")
    uri = "memory://flopcount-lease-test/run"
    try:
        with flopcount.meter(out=uri, backend="dispatch"):
            held = json.loads(memory.cat_file("/flopcount-lease-test/run/lease/r00000.lease"))
            assert held["pid"] == os.getpid() and held["expires"] > time.time()
            with pytest.raises(lease.LeaseHeld, match="another meter in this process|being written"):
                lease.acquire(open_storage(uri), 0)  # the exclusive create fails: the object exists
        assert not memory.exists("/flopcount-lease-test/run/lease/r00000.lease")  # released
        # A lease object of a writer on another host that stopped its heartbeat 1 s ago.
        stale = {"host": "other-host", "pid": 7, "started": time.time() - 100, "expires": time.time() - 1,
                 "nonce": "x"}
        memory.pipe_file("/flopcount-lease-test/run/lease/r00000.lease", json.dumps(stale).encode())
        live = dict(stale, host="other-host", expires=time.time() + 60)
        memory.pipe_file("/flopcount-lease-test/run/lease/r00001.lease", json.dumps(live).encode())
        train(uri, steps=2)
        with pytest.raises(lease.LeaseHeld, match="pid 7 on host other-host"):
            lease.acquire(open_storage(uri), 1)  # not expired: still held
        entries = mf.parse(memory.cat_file("/flopcount-lease-test/run/manifest/r00000.jsonl"), "m")
        assert [e["takeover"] for e in entries if e["type"] == "segment"][-1]["host"] == "other-host"
        assert flopcount.summarize(uri)["by_category"]["matmul"] == 2 * MATMUL_PER_STEP
    finally:
        memory.rm("/flopcount-lease-test", recursive=True)


def test_object_store_heartbeat_renews_the_expiry():
    pytest.importorskip("fsspec")
    import fsspec

    memory = fsspec.filesystem("memory")
    storage = open_storage("memory://flopcount-heartbeat/run")
    storage.makedirs("lease")
    held = lease.acquire(storage, 0, ttl=0.3)
    try:
        first = json.loads(memory.cat_file("/flopcount-heartbeat/run/lease/r00000.lease"))["expires"]
        time.sleep(0.5)  # past the first expiry: renewed at ttl/3 intervals
        renewed = json.loads(memory.cat_file("/flopcount-heartbeat/run/lease/r00000.lease"))["expires"]
        assert renewed > first and not held.lost
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(storage, 0, ttl=0.3)
    finally:
        held.release()
        memory.rm("/flopcount-heartbeat", recursive=True)


def test_first_free_slots_give_every_process_its_own_writer(tmp_path):
    storage = open_storage(tmp_path / "run")
    storage.makedirs("lease")
    taken = [lease.acquire_first_free(storage, 0) for _ in range(3)]
    assert [process for process, _ in taken] == [0, 1, 2]
    taken[1][1].release()
    again = lease.acquire_first_free(storage, 0)
    assert again[0] == 1  # the first free slot
    for _, held in taken + [again]:
        held.release()
    assert lease.active_holders(storage) == []
