"""Per-step Parquet traces: schema, values, flushing, resume, integrity and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import flopcount
from flopcount.conventions import BUILTIN_PHASES, CATEGORIES
from flopcount.trace import manifest as mf
from flopcount.trace.reader import open_traces
from flopcount.trace.schema import STEPS_SCHEMA, TRACE_SCHEMA
from flopcount.trace.storage import TraceError
from tracegen import BATCH, IN, MATMUL_PER_STEP, OUT, TOKENS_PER_SAMPLE, train, tree_digest


def test_steps_table_has_one_row_per_step_with_closed_form_values(tmp_path):
    meter = train(tmp_path / "run", steps=7, flush_every=3, eval_every=2)
    frame = flopcount.read_trace(tmp_path / "run")
    assert list(frame.columns) == STEPS_SCHEMA.names
    assert list(frame["step"]) == list(range(7))
    assert set(frame["run_id"]) == {"run"} and set(frame["rank"]) == {0} and set(frame["world_size"]) == {1}
    assert list(frame["tokens"]) == [BATCH * TOKENS_PER_SAMPLE] * 7
    assert list(frame["samples"]) == [BATCH] * 7
    # Training matmul work per step, in closed form; eval steps add 2*B*IN*OUT more to cat_matmul.
    evals = [1 if step % 2 == 0 else 0 for step in range(7)]
    expected_matmul = [MATMUL_PER_STEP + e * MATMUL_PER_STEP // 2 for e in evals]
    assert list(frame["cat_matmul"]) == expected_matmul
    phases = frame[[f"phase_{p}" for p in BUILTIN_PHASES] + ["phase_user"]].sum(axis=1)
    categories = frame[[f"cat_{c}" for c in CATEGORIES]].sum(axis=1)
    assert (phases == frame["hardware_flops"]).all() and (categories == frame["hardware_flops"]).all()
    assert (frame["training_flops"] == frame["hardware_flops"] - frame["phase_eval"]).all()
    assert (frame["phase_eval"] > 0).tolist() == [bool(e) for e in evals]
    # The trace agrees with the meter's own totals.
    assert int(frame["training_flops"].sum()) == meter.summary()["training_flops"]
    assert (frame["end_time"] >= frame["start_time"]).all()


def test_flush_writes_complete_parts_and_a_chained_manifest(tmp_path):
    train(tmp_path / "run", steps=7, flush_every=3)
    parts = sorted(os.listdir(tmp_path / "run" / "steps"))
    assert parts == ["r00000-000000.parquet", "r00000-000001.parquet", "r00000-000002.parquet"]  # 3 + 3 + 1
    assert [pq.read_metadata(tmp_path / "run" / "steps" / p).num_rows for p in parts] == [3, 3, 1]
    assert not [f for d in ("steps", "breakdown", "manifest") for f in os.listdir(tmp_path / "run" / d)
                if ".tmp-" in f]
    entries = mf.parse((tmp_path / "run" / "manifest" / "r00000.jsonl").read_bytes(), "manifest")
    assert [e["type"] for e in entries] == ["segment", "part", "part", "part", "close"]
    assert entries[0]["prev"] == mf.GENESIS and entries[0]["schema"] == TRACE_SCHEMA
    for before, after in zip(entries, entries[1:]):
        assert after["prev"] == before["hash"]
    assert mf.chain_problems(entries, "m", None) == []
    assert [(e["first_step"], e["last_step"]) for e in entries if e["type"] == "part"] == [(0, 2), (3, 5), (6, 6)]


def test_breakdown_table_adds_up_to_the_steps_table(tmp_path):
    with flopcount.meter(out=tmp_path / "run", flush_every=2, backend="dispatch") as meter:
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.ReLU())
        for _ in range(3):
            with meter.phase("generation"):
                model(torch.randn(4, 8))
            with meter.phase("scoring", training=False):
                model(torch.randn(4, 8))
            model(torch.randn(4, 8)).sum().backward()
            meter.step()
    steps = flopcount.read_trace(tmp_path / "run")
    breakdown = flopcount.read_trace(tmp_path / "run", table="breakdown")
    flops = breakdown[breakdown["kind"] == "flops"]
    assert int(flops["value"].sum()) == int(steps["hardware_flops"].sum())
    assert int(flops[flops["training"]]["value"].sum()) == int(steps["training_flops"].sum())
    # User phases live as values of breakdown.phase, their sum in steps.phase_user.
    user = flops[flops["phase"].isin(["generation", "scoring"])]
    assert int(user["value"].sum()) == int(steps["phase_user"].sum())
    assert set(flops[flops["phase"] == "generation"]["training"]) == {True}
    assert set(flops[flops["phase"] == "scoring"]["training"]) == {False}
    # Forward product of Linear(8, 6) on 4 rows in each of the two user phases and each step.
    generation_mm = flops[(flops["phase"] == "generation") & (flops["category"] == "matmul")]
    assert int(generation_mm["value"].sum()) == 3 * 2 * 4 * 8 * 6
    assert set(generation_mm["module"]) == {"0"}
    calls = breakdown[breakdown["kind"] == "calls"]
    assert int(calls[(calls["op"] == "aten.mm") & (calls["phase"] == "generation")]["value"].sum()) == 3


def test_resume_appends_a_segment_and_continues_step_numbers(tmp_path):
    train(tmp_path / "run", steps=5, flush_every=2)
    meter = train(tmp_path / "run", steps=4, flush_every=2)
    frame = flopcount.read_trace(tmp_path / "run")
    assert list(frame["step"]) == list(range(9))
    assert list(frame["segment"]) == [0] * 5 + [1] * 4
    assert meter.summary()["steps"] == 4 and meter.run_id == "run"
    entries = mf.parse((tmp_path / "run" / "manifest" / "r00000.jsonl").read_bytes(), "m")
    assert [e["segment"] for e in entries if e["type"] == "segment"] == [0, 1]
    assert mf.verify(open_traces(tmp_path / "run").traces[0].storage).ok
    with pytest.raises(ValueError, match="pass run_id='run' to resume"):
        train(tmp_path / "run", steps=1, run_id="other")


JOB_WITH_A_FINAL_EVALUATION = textwrap.dedent("""
    import sys, torch, flopcount
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=sys.argv[1], flush_every=2, backend="dispatch") as m:
        for _ in range(3):
            layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
        with torch.no_grad():
            layer(torch.randn(4, 8))  # the final evaluation: trailing work, not a step
""")


def test_a_resumed_job_numbers_its_steps_after_the_last_step_not_after_the_trailing_row(tmp_path):
    """A job (3 optimizer steps, then a final evaluation: a trailing row) is closed and restarted
    in a new process. Step numbers are the rank's optimizer steps: the resumed job's first step is
    step 3; each trailing row carries the number of the step that follows it."""
    script = tmp_path / "job.py"
    script.write_text(JOB_WITH_A_FINAL_EVALUATION)
    run = tmp_path / "run"
    for _ in range(2):
        subprocess.run([sys.executable, str(script), str(run)], check=True, timeout=120)
    frame = flopcount.read_trace(run)
    steps = frame[~frame["trailing"].astype(bool)]
    assert steps["step"].tolist() == list(range(6)) and steps["segment"].tolist() == [0] * 3 + [1] * 3
    trailing = frame[frame["trailing"].astype(bool)]
    assert trailing["step"].tolist() == [3, 6] and trailing["segment"].tolist() == [0, 1]
    summary = flopcount.summarize(run)
    product = 2 * BATCH * IN * OUT  # one Linear(8, 6) product on 4 rows
    assert summary["steps"] == 6
    assert summary["by_phase_category"]["forward"]["matmul"] == 6 * product
    assert summary["by_phase_category"]["backward"]["matmul"] == 6 * product  # the weight gradient
    assert summary["by_phase_category"]["eval"]["matmul"] == 2 * product  # both final evaluations
    assert summary["trailing_flops"] == summary["by_phase"]["eval"]
    assert summary["hardware_flops"] == int(frame["hardware_flops"].sum())
    verify = subprocess.run([sys.executable, "-m", "flopcount.cli", "verify", str(run)], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr


def test_ranks_keep_the_same_step_numbers_when_only_one_has_trailing_work(tmp_path, monkeypatch):
    """Rank 0 alone runs a final evaluation (a trailing row) and the job is resumed: the ranks'
    step numbers stay the same, so the job's steps count once per optimizer step (3 + 3)."""
    product = 2 * BATCH * IN * OUT
    for _ in range(2):
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            torch.manual_seed(0)
            layer = torch.nn.Linear(IN, OUT, bias=False)
            opt = torch.optim.SGD(layer.parameters(), lr=0.1)
            with flopcount.meter(out=tmp_path / "job", flush_every=2, backend="dispatch"):
                for _ in range(3):
                    layer(torch.randn(BATCH, IN)).sum().backward(); opt.step(); opt.zero_grad()
                if rank == 0:
                    with torch.no_grad():
                        layer(torch.randn(BATCH, IN))
    frame = flopcount.read_trace(tmp_path / "job")
    steps = frame[~frame["trailing"].astype(bool)]
    for rank in (0, 1):
        assert steps[steps["rank"] == rank]["step"].tolist() == list(range(6))
    summary = flopcount.summarize(tmp_path / "job")
    assert summary["steps"] == 6
    assert summary["by_phase_category"]["forward"]["matmul"] == 2 * 6 * product
    assert summary["by_phase_category"]["eval"]["matmul"] == 2 * product
    assert subprocess.run([sys.executable, "-m", "flopcount.cli", "verify", str(tmp_path / "job")],
                          capture_output=True, timeout=120).returncode == 0


def test_ranks_write_side_by_side_and_keep_their_own_step_numbers(tmp_path, monkeypatch):
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        train(tmp_path / "job", steps=3)
    frame = flopcount.read_trace(tmp_path / "job")
    assert list(zip(frame["step"], frame["rank"])) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert set(frame["world_size"]) == {2}
    assert sorted(os.listdir(tmp_path / "job" / "manifest")) == ["r00000.jsonl", "r00001.jsonl"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch, flopcount
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=sys.argv[1], flush_every=2, backend="dispatch") as m:
        step = 0
        while True:
            layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
            m.step(tokens=12)
            step += 1
            print(step, flush=True)
""")


def test_kill_9_keeps_every_flushed_step_and_resume_continues(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if int(line) >= 41:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    frame = flopcount.read_trace(run)
    flushed = len(frame)
    assert flushed >= 40 and flushed % 2 == 0  # whole parts of 2 steps, nothing torn
    assert list(frame["step"]) == list(range(flushed))
    check = mf.verify(open_traces(run).traces[0].storage)
    # Only a part renamed in the instant before its manifest entry could be unlisted.
    assert all("unlisted" in p for p in check.problems)
    train(run, steps=3, flush_every=2)
    frame = flopcount.read_trace(run)
    assert list(frame["step"]) == list(range(flushed + 3))
    assert mf.verify(open_traces(run).traces[0].storage).ok


def test_verify_finds_altered_missing_and_unlisted_parts(tmp_path):
    train(tmp_path / "run", steps=6, flush_every=2)
    storage = open_traces(tmp_path / "run").traces[0].storage
    assert mf.verify(storage).ok and mf.verify(storage).parts_checked == 6
    steps_dir = tmp_path / "run" / "steps"
    altered = steps_dir / "r00000-000001.parquet"
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    (tmp_path / "run" / "breakdown" / "r00000-000002.parquet").unlink()
    (steps_dir / "r00000-000099.parquet").write_bytes((steps_dir / "r00000-000000.parquet").read_bytes())
    problems = mf.verify(storage).problems
    assert any("r00000-000001.parquet: SHA-256 does not match" in p for p in problems)
    assert any("breakdown/r00000-000002.parquet: missing" in p for p in problems)
    assert any("r00000-000099.parquet: not listed" in p for p in problems)
    assert len(problems) == 3


def test_verify_detects_an_edited_manifest_entry(tmp_path):
    train(tmp_path / "run", steps=4, flush_every=2)
    path = tmp_path / "run" / "manifest" / "r00000.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["rows"] = 1  # rewrite history without fixing the hash
    lines[1] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    problems = mf.verify(open_traces(tmp_path / "run").traces[0].storage).problems
    assert problems == ["manifest/r00000.jsonl entry 2: hash does not match its content (entry altered)"]


def test_hmac_signing_with_a_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(mf.HMAC_ENV, "secret-1")
    train(tmp_path / "run", steps=2, flush_every=1)
    storage = open_traces(tmp_path / "run").traces[0].storage
    result = mf.verify(storage)
    assert result.ok and result.signed
    monkeypatch.setenv(mf.HMAC_ENV, "another-key")
    assert any("HMAC signature does not match" in p for p in mf.verify(storage).problems)
    monkeypatch.delenv(mf.HMAC_ENV)
    assert mf.verify(storage).ok  # hashes still check without the key


def test_reading_bad_input_raises_one_line_errors_and_modifies_nothing(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        flopcount.read_trace(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="is empty"):
        flopcount.read_trace(tmp_path / "empty")
    train(tmp_path / "run", steps=4, flush_every=2)
    part = tmp_path / "run" / "steps" / "r00000-000001.parquet"
    part.write_bytes(part.read_bytes()[:100])  # truncated
    before = tree_digest(tmp_path / "run")
    with pytest.raises(TraceError, match=r"r00000-000001.parquet is not a readable Parquet file") as error:
        flopcount.read_trace(tmp_path / "run")
    assert "\n" not in str(error.value)
    assert tree_digest(tmp_path / "run") == before


def test_wrong_schema_version_is_refused(tmp_path):
    train(tmp_path / "run", steps=2, flush_every=2)
    part = tmp_path / "run" / "steps" / "r00000-000000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({b"flopcount.schema": b"flopcount.trace/9"}), part)
    with pytest.raises(TraceError, match="trace schema flopcount.trace/9; this flopcount reads flopcount.trace/1"):
        flopcount.read_trace(tmp_path / "run")


def test_fsspec_uri_output(tmp_path):
    pytest.importorskip("fsspec")
    import fsspec

    train("memory://flopcount-test/run", steps=3, flush_every=2)
    frame = flopcount.read_trace("memory://flopcount-test/run")
    assert list(frame["step"]) == [0, 1, 2]
    assert list(frame["cat_matmul"]) == [MATMUL_PER_STEP] * 3
    fsspec.filesystem("memory").rm("/flopcount-test", recursive=True)


def test_pandas_reads_a_table_directory_directly(tmp_path):
    train(tmp_path / "run", steps=5, flush_every=2)
    frame = pd.read_parquet(tmp_path / "run" / "steps")
    assert sorted(frame["step"]) == list(range(5))
    assert pa.Schema.from_pandas(frame).field("training_flops").type == pa.int64()
