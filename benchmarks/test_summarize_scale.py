"""Scale of the trace tools: summarizing 10 million step rows, and the trace write cost per step.

Run: `make bench` or `pytest benchmarks/test_summarize_scale.py --benchmark-only -s`.

- Summarize: a synthetic trace of 1,000 ranks x 10,000 steps (one steps part and one breakdown
  part per rank, manifests as the writer makes them). Goal: under 30 s on 2 cores, with memory
  bounded by streaming: the peak RSS of a `flopcount summarize` process is measured for the
  10M-row trace and a 1M-row trace of the same ranks; it must not grow with the rows.
- Write cost: the real TraceWriter fed the real StepRecord of the reference CPU step
  (benchmarks/reference_step.py), flush_every=50 so flushes are amortized as in a run; goal:
  below 1 % of the reference step, which is timed in the same run (with FlopCounterMode beside it).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flopcount.trace import manifest as mf
from flopcount.trace.schema import BREAKDOWN_SCHEMA, STEPS_SCHEMA, TRACE_SCHEMA, manifest_path, part_path

RANKS = 1000
STEPS = 10_000
SUMMARIZE_GOAL_S = 30.0
WRITE_COST_GOAL = 0.01


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _write(root: str, rel: str, data: bytes) -> str:
    path = os.path.join(root, rel)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def make_synthetic_trace(root: str, ranks: int, steps: int, seed: int = 0) -> int:
    """A trace dir of ``ranks`` x ``steps`` rows; returns its exact total training FLOPs."""
    for sub in ("steps", "breakdown", "manifest"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    step = np.arange(steps, dtype=np.int64)
    zeros = np.zeros(steps, dtype=np.int64)
    total = 0
    for rank in range(ranks):
        training = rng.integers(10**13, 10**14, steps, dtype=np.int64)
        evaluation = training // 10
        columns = {
            "run_id": pa.array(["synthetic"] * steps), "rank": np.full(steps, rank, np.int32),
            "world_size": np.full(steps, ranks, np.int32), "segment": np.zeros(steps, np.int32), "step": step,
            "start_time": 1.7e9 + step * 2.0, "end_time": 1.7e9 + step * 2.0 + 2.0,
            "tokens": np.full(steps, 4096, np.int64), "samples": np.full(steps, 8, np.int64),
            "training_flops": training, "hardware_flops": training + evaluation,
            # devices and energy as a GPU rank records them (docs/energy.md)
            "device_name": pa.array(["NVIDIA H100 80GB HBM3"] * steps), "device_count": np.ones(steps, np.int32),
            "gpu_energy_j": rng.uniform(1000.0, 1400.0, steps), "gpu_energy_source": pa.array(["nvml_energy_counter"] * steps),
            "gpu_energy_devices": np.ones(steps, np.int32), "cpu_energy_j": pa.nulls(steps, pa.float64()),
            "cpu_energy_source": pa.array(["rapl_local_rank_0"] * steps),
        }
        for field in STEPS_SCHEMA:
            if field.name not in columns:
                columns[field.name] = zeros
        columns["phase_forward"], columns["phase_backward"] = training // 3, training - training // 3
        columns["phase_eval"], columns["cat_matmul"] = evaluation, training + evaluation
        steps_table = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in STEPS_SCHEMA],
                                           schema=STEPS_SCHEMA)
        rank_training, rank_eval = int(training.sum()), int(evaluation.sum())
        total += rank_training
        modules = [f"model.layers.{i}.mlp" for i in range(10)]
        rows = [("flops", "forward", "matmul", m, "aten.mm", True, rank_training // 10) for m in modules]
        rows[-1] = rows[-1][:6] + (rank_training - 9 * (rank_training // 10),)
        rows.append(("flops", "eval", "matmul", "model.layers.0.mlp", "aten.mm", False, rank_eval))
        rows.append(("calls", "forward", None, None, "aten.mm", None, 10 * steps))
        kind, phase, category, module, op, train, value = zip(*rows)
        n = len(rows)
        breakdown = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(
                [["synthetic"] * n, [rank] * n, [0] * n, [0] * n, [steps - 1] * n,
                 kind, phase, category, module, op, train, value], BREAKDOWN_SCHEMA)], schema=BREAKDOWN_SCHEMA)
        entry = {"type": "part", "seq": 0, "segment": 0, "first_step": 0, "last_step": steps - 1, "rows": steps,
                 "written": 1.7e9 + steps * 2.0}
        for name, table in (("steps", steps_table), ("breakdown", breakdown)):
            data = _parquet(table)
            rel = part_path(name, rank, 0)
            entry[name] = {"file": rel, "sha256": _write(root, rel, data), "bytes": len(data), "rows": table.num_rows}
        segment = {"type": "segment", "schema": TRACE_SCHEMA, "run_id": "synthetic", "rank": rank,
                   "world_size": ranks, "segment": 0, "first_step": 0, "started": 1.7e9, "backend": "synthetic",
                   "base_model": "meta-llama/Llama-3.1-8B", "base_model_flops": None, "module_depth": None}
        first = mf.seal(segment, mf.GENESIS, None)
        _write(root, manifest_path(rank), mf.dumps([first, mf.seal(entry, first["hash"], None)]))
    return total


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    big, small = str(root / "10M"), str(root / "1M")
    started = time.perf_counter()
    totals = {big: make_synthetic_trace(big, RANKS, STEPS), small: make_synthetic_trace(small, RANKS, STEPS // 10)}
    print(f"\nsynthetic traces generated in {time.perf_counter() - started:.1f} s")
    return big, small, totals


PEAK_RSS = """
import json, resource, sys, time
from flopcount.summary import summarize
started = time.perf_counter()
summary = summarize(sys.argv[1])
elapsed = time.perf_counter() - started
print(json.dumps({"training_flops": summary["training_flops"], "elapsed": elapsed,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _summarize_in_subprocess(path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_summarize_10m_rows(benchmark, traces):
    from flopcount.summary import summarize

    big, small, totals = traces
    summary = benchmark.pedantic(summarize, args=(big,), rounds=3, iterations=1)
    assert summary["training_flops"] == totals[big]
    assert summary["steps"] == STEPS and len(summary["ranks"]) == RANKS
    median = benchmark.stats.stats.median
    big_run, small_run = _summarize_in_subprocess(big), _summarize_in_subprocess(small)
    raw_mib = RANKS * STEPS * sum(f.type.bit_width // 8 if f.type != pa.string() else 9 for f in STEPS_SCHEMA) / 2**20
    print(f"\nsummarize {RANKS * STEPS:,} rows: median {median:.2f} s over 3 rounds; "
          f"subprocess {big_run['elapsed']:.2f} s, peak RSS {big_run['peak_rss_kib'] / 1024:.0f} MiB; "
          f"{RANKS * STEPS // 10:,} rows: peak RSS {small_run['peak_rss_kib'] / 1024:.0f} MiB; "
          f"steps table in memory would be {raw_mib:.0f} MiB")
    assert median < SUMMARIZE_GOAL_S
    # Streaming: 10x the rows may not cost more than a few part-sized buffers of extra memory.
    assert big_run["peak_rss_kib"] < small_run["peak_rss_kib"] + 200 * 1024
    assert big_run["peak_rss_kib"] < raw_mib * 1024 / 2


def _median_step_s(step, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_trace_write_cost_per_step(benchmark, tmp_path):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import flopcount
    from reference_step import build, train_step

    torch.set_num_threads(2)
    model, optimizer, ids = build()
    train_step(model, optimizer, ids)  # warm-up
    step = lambda: train_step(model, optimizer, ids)  # noqa: E731
    baseline = _median_step_s(step, 5)
    with FlopCounterMode(display=False):
        flop_counter = _median_step_s(step, 3)
    with flopcount.meter(backend="dispatch", warn=False) as meter:
        train_step(model, optimizer, ids)
        meter.step(tokens=int(ids.numel()))
    record = meter.last_step
    writer_meter = flopcount.Meter(tmp_path / "trace", flush_every=50)
    writer = writer_meter.open_writer()
    writes = 500

    def write_many():
        for i in range(writes):
            record.step = i
            writer.write(record)

    benchmark.pedantic(write_many, rounds=3, iterations=1)
    per_step = benchmark.stats.stats.median / writes
    print(f"\nreference step {baseline * 1e3:.1f} ms (FlopCounterMode {flop_counter * 1e3:.1f} ms); "
          f"trace write {per_step * 1e6:.0f} us/step incl. flushes every 50 steps "
          f"({len(record.flops)} breakdown keys/step) = {per_step / baseline:.3%} of the step")
    assert per_step < WRITE_COST_GOAL * baseline
