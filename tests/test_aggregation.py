"""One aggregation path: a closed step becomes trace rows by column name (StepRecord.to_batches),
a StepWindow makes them record batches of the schema, and summarize_batches adds them up for
Meter.summary() and summarize() alike; the schema documents itself (docs/traces.md)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

import flopcount
from flopcount.accounting import StepRecord, StepWindow
from flopcount.conventions import TRAINING_PHASES
from flopcount.summary import LIVE_WINDOW_STEPS, summarize_batches
from flopcount.trace.schema import BREAKDOWN_SCHEMA, STEPS_SCHEMA, markdown_table, markers
from tracegen import BATCH, MATMUL_PER_STEP, TOKENS_PER_SAMPLE, train

WRITER_COLUMNS = {"run_id": "r", "rank": 3, "world_size": 4, "segment": 1, "device_name": "cpu x", "device_count": 1}
MM, SDPA, ADD = "aten.mm", "aten.sdpa", "aten.add"


def record(step: int, mm: int = 100) -> StepRecord:
    return StepRecord(
        step=step, start_time=10.0 + step, end_time=11.0 + step, tokens=7, samples=None,
        flops={("forward", "matmul", "m.a", MM): mm, ("backward", "matmul", "m.a", MM): 2 * mm,
               ("recompute", "attention", "m.b", SDPA): 5, ("rollout", "pointwise", "m.b", ADD): 11},
        calls={(MM, "forward"): 1, (MM, "backward"): 1, (SDPA, "recompute"): 1, (ADD, "rollout"): 3},
        uncounted={"x.y": 2}, training_phases=TRAINING_PHASES | {"rollout"},
        collectives={"c10d.allreduce_": 1}, collective_bytes={"c10d.allreduce_": 4096},
        dark_modules={"m.c": "Opaque"})


def test_a_closed_step_becomes_rows_by_column_name():
    batches = record(3).to_batches()
    row = {name: values[0] for name, values in batches["steps"].items()}
    assert set(row) == set(STEPS_SCHEMA.names) - set(WRITER_COLUMNS)  # the writer adds its own columns
    assert row["training_flops"] == 100 + 200 + 11 and row["hardware_flops"] == 100 + 200 + 5 + 11
    assert (row["phase_forward"], row["phase_backward"], row["phase_recompute"], row["phase_user"]) == (100, 200, 5, 11)
    assert (row["cat_matmul"], row["cat_attention"], row["cat_pointwise"], row["cat_conv"]) == (300, 5, 11, 0)
    assert (row["uncounted_calls"], row["collective_calls"], row["collective_bytes"]) == (2, 1, 4096)
    assert row["gpu_energy_j"] is None and row["cpu_energy_source"] is None and row["trailing"] is False
    breakdown = batches["breakdown"]
    rows = set(zip(*(breakdown[c] for c in ("kind", "phase", "category", "module", "op", "training", "value"))))
    assert ("flops", "rollout", "pointwise", "m.b", ADD, True, 11) in rows
    assert ("flops", "recompute", "attention", "m.b", SDPA, False, 5) in rows
    assert ("calls", "rollout", None, None, ADD, None, 3) in rows
    assert ("dark_module", None, None, "m.c", "Opaque", None, 1) in rows
    assert len(rows) == 4 + 4 + 1 + 1 + 1 + 1


def test_a_window_makes_record_batches_of_the_schema_and_sums_keys():
    taken = []
    window = StepWindow(2, lambda: taken.append(window.batches(WRITER_COLUMNS)))
    for step in (5, 6):
        window.add(record(step).to_batches())
    (batches,) = taken
    assert batches["steps"].schema == STEPS_SCHEMA and batches["breakdown"].schema == BREAKDOWN_SCHEMA
    steps = batches["steps"].to_pydict()
    assert steps["step"] == [5, 6] and steps["rank"] == [3, 3] and steps["device_name"] == ["cpu x"] * 2
    breakdown = batches["breakdown"].to_pylist()
    assert {(r["first_step"], r["last_step"], r["segment"]) for r in breakdown} == {(5, 6, 1)}
    by_key = {(r["kind"], r["phase"], r["op"]): r["value"] for r in breakdown}
    assert by_key[("flops", "backward", MM)] == 2 * 200 and by_key[("calls", "rollout", ADD)] == 2 * 3
    assert by_key[("dark_module", None, "Opaque")] == 2  # steps in which the module was dark
    assert [r["kind"] for r in breakdown] == sorted((r["kind"] for r in breakdown), key=[
        "flops", "calls", "uncounted", "collective_calls", "collective_bytes", "dark_module"].index)
    assert len(window) == 0 and window.hardware_flops == 0


def test_a_window_is_taken_before_its_sums_would_leave_int64():
    per_step = 3 * 10**18  # three steps do not fit int64
    taken = []
    window = StepWindow(100, lambda: taken.append(window.batches(WRITER_COLUMNS)))
    for step in range(5):
        window.add(record(step, mm=per_step).to_batches())
    assert [b["steps"].num_rows for b in taken] == [1, 1, 1, 1]  # 3 x 3e18 + ... > 2**63 - 1
    assert len(window) == 1 and window.hardware_flops == 3 * per_step + 16
    # One step past int64 (was BadInput at m.step(): an exception into the training loop) takes
    # several rows of the same step, each within int64, adding up exactly (test_trace_int64.py).
    huge = record(0, mm=2**62).to_batches()["steps"]
    assert huge["step"] == [0, 0] and all(v <= 2**63 - 1 for v in huge["hardware_flops"])
    assert sum(huge["hardware_flops"]) == 3 * 2**62 + 16 and sum(huge["phase_backward"]) == 2**63


def test_meter_summary_summarize_and_summarize_batches_agree_on_real_parquet(tmp_path):
    steps = LIVE_WINDOW_STEPS + 6  # past the live meter's window
    meter = train(tmp_path / "run", steps=steps, flush_every=16, eval_every=10)
    live, written = meter.summary(), flopcount.summarize(tmp_path / "run")
    parts = {table: [batch for path in sorted((tmp_path / "run" / table).glob("*.parquet"))
                     for batch in pq.ParquetFile(path).iter_batches()] for table in ("steps", "breakdown")}
    assert len(parts["steps"]) == -(-steps // 16)
    direct = summarize_batches(parts["steps"], parts["breakdown"])
    evals = len(range(0, steps, 10))
    for summary in (live, written, direct):
        assert summary["training_by_category"]["matmul"] == steps * MATMUL_PER_STEP
        assert summary["by_category"]["matmul"] == steps * MATMUL_PER_STEP + evals * MATMUL_PER_STEP // 2
        assert summary["by_op"]["aten.mm"]["calls"] == 2 * steps + evals
        assert summary["steps"] == steps and summary["tokens"] == steps * BATCH * TOKENS_PER_SAMPLE
        assert summary["samples"] == steps * BATCH
    assert set(direct) < set(live) == set(written)
    for key in direct:
        assert live[key] == written[key] == direct[key], key


def test_schema_tables_in_docs_match_the_schema():
    docs = (Path(__file__).parents[1] / "docs" / "traces.md").read_text()
    for table, schema in (("steps", STEPS_SCHEMA), ("breakdown", BREAKDOWN_SCHEMA)):
        begin, end = markers(table)
        assert f"{begin}\n{markdown_table(table)}\n{end}" in docs, f"python -m flopcount.trace.schema --update docs/traces.md"
        assert all(f"`{name}`" in markdown_table(table) for name in schema.names)
