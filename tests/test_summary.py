"""Roll-ups of traces across steps, ranks and runs (flopcount.summarize)."""
from __future__ import annotations

import pytest

import flopcount
from flopcount.accounting import StepRecord
from flopcount.trace.storage import TraceError
from tracegen import BATCH, MATMUL_PER_STEP, TOKENS_PER_SAMPLE, train

# Keys whose values legitimately differ between a live meter and the written traces.
PER_PROCESS = {"method"}  # hardware is recorded per segment; the rest of the method statement matches


def test_summarize_has_the_meter_summary_keys_and_values(tmp_path):
    meter = train(tmp_path / "run", steps=6, flush_every=4, eval_every=3, base_model="llama-2-7b")
    live, written = meter.summary(), flopcount.summarize(tmp_path / "run")
    assert set(written) == set(live)
    for key in set(live) - PER_PROCESS - {"by_op"}:
        assert written[key] == live[key], key
    assert {op: v["flops"] for op, v in written["by_op"].items()} == {op: v["flops"] for op, v in live["by_op"].items()}
    # aten.mm runs once in forward, once in backward and (every third step) once in eval.
    assert written["by_op"]["aten.mm"]["calls"] == 6 * 2 + 2
    assert written["by_category"]["matmul"] == 6 * MATMUL_PER_STEP + 2 * MATMUL_PER_STEP // 2
    assert written["training_by_category"]["matmul"] == 6 * MATMUL_PER_STEP
    assert written["tokens"] == 6 * BATCH * TOKENS_PER_SAMPLE and written["samples"] == 6 * BATCH
    assert written["compliance"]["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert written["compliance"]["threshold_flops"] == pytest.approx(8.4e22 / 3)
    assert written["method"]["phases_excluded"].keys() == {"eval", "recompute"}
    assert written["method"]["hardware"]["cpu_count"] >= 1


def test_ranks_and_runs_of_a_project_add_up(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for run, steps in (("a", 3), ("b", 5)):
        for rank in (0, 1):
            monkeypatch.setenv("RANK", str(rank))
            train(tmp_path / "project" / run, steps=steps, flush_every=2)
    summary = flopcount.summarize(tmp_path / "project")
    assert summary["training_by_category"]["matmul"] == (3 + 5) * 2 * MATMUL_PER_STEP
    assert summary["steps"] == 3 + 5  # distinct steps per run; ranks of one step count once
    assert summary["ranks"] == [0, 1] and summary["world_size"] == 2 and summary["rank"] is None
    assert summary["run_id"] == ["a", "b"]
    assert summary["tokens"] == (3 + 5) * 2 * BATCH * TOKENS_PER_SAMPLE
    one_run = flopcount.summarize(tmp_path / "project" / "b")
    assert one_run["run_id"] == "b" and one_run["steps"] == 5
    assert one_run["training_by_category"]["matmul"] == 5 * 2 * MATMUL_PER_STEP


def _synthetic_record(step: int, flops: int) -> StepRecord:
    return StepRecord(step=step, start_time=1000.0 + step, end_time=1001.0 + step, tokens=10, samples=None,
                      flops={("forward", "matmul", "model.layers.0.mlp", "aten.mm"): flops,
                             ("recompute", "attention", "model.layers.0.attn", "aten.sdpa"): 7},
                      calls={("aten.mm", "forward"): 1, ("aten.sdpa", "recompute"): 1}, uncounted={"x.y": 2})


def test_totals_beyond_int64_are_exact(tmp_path, monkeypatch):
    per_step = 3 * 10**18  # one step fits int64; five steps of two ranks do not
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        meter = flopcount.Meter(tmp_path / "big", flush_every=2)
        meter.rank, meter.world_size = rank, 2
        writer = meter.open_writer()
        for step in range(5):
            writer.write(_synthetic_record(step, per_step))
        writer.close({"training_flops": 5 * per_step, "hardware_flops": 5 * (per_step + 7)})
    summary = flopcount.summarize(tmp_path / "big", module_depth=2)
    assert summary["training_flops"] == 2 * 5 * per_step > 2**63
    assert summary["hardware_flops"] == 2 * 5 * (per_step + 7)
    assert summary["by_phase"] == {"forward": 10 * per_step, "recompute": 70}
    assert summary["by_module"] == {"model.layers": 10 * per_step + 70}
    assert summary["uncounted_ops"] == {"x.y": 20}
    assert summary["samples"] is None and summary["tokens"] == 100
    assert summary["start_time"] == 1000.0 and summary["end_time"] == 1005.0


def test_runs_on_different_base_models_are_not_added(tmp_path):
    train(tmp_path / "p" / "a", steps=1, base_model="llama-2-7b")
    train(tmp_path / "p" / "b", steps=1, base_model="qwen2.5-7b")
    with pytest.raises(TraceError, match="record different base models"):
        flopcount.summarize(tmp_path / "p")


def test_unregistered_base_model_in_a_live_meter_falls_back_to_the_cautious_threshold(tmp_path):
    meter = train(None, steps=1, base_model="my-org/private-base")
    block = meter.summary()["compliance"]
    assert block["threshold_basis"] == "unknown_base_compute"
    assert block["threshold_flops"] == pytest.approx(1e23 / 3)
    assert "not in the registry" in block["note"]


def test_summarize_of_a_meter_without_steps(tmp_path):
    with flopcount.meter(out=tmp_path / "idle", backend="dispatch"):
        pass
    summary = flopcount.summarize(tmp_path / "idle")
    assert summary["steps"] == 0 and summary["training_flops"] == 0 and summary["run_id"] == "idle"
