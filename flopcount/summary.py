"""Roll-ups of written traces across steps, ranks and runs: ``flopcount summarize DIR``.

The result has the same keys as ``Meter.summary()`` (it is built by the same ``Rollup``), with
these meanings across ranks and runs:

- totals (``training_flops``, ``by_phase``, ``by_module``, ...) add up every rank of every run:
  a project dir holding several runs on one base model is one modification;
- ``steps`` is the number of distinct optimizer steps of each run, added over runs (ranks of
  one step count once; rows marked ``trailing`` are not steps, their FLOPs are in the totals
  and in ``trailing_flops``); ``tokens`` and ``samples`` add up the per-rank counts;
- ``run_id``, ``rank``, ``backend`` and ``torch_version`` are single values when all runs agree,
  else lists (``rank`` is None for several ranks); ``world_size`` is the largest recorded.

Parts are streamed in record batches and FLOP columns are summed exactly (64-bit values split
into 32-bit halves, so no int64 sum overflows), so memory does not grow with the trace size.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .accounting import Rollup
from .compliance import add_method_and_compliance
from .energy import RESOURCE_COLUMNS, ResourceTally, resources_summary
from .trace.reader import TraceSet, iter_batches, open_traces
from .trace.storage import TraceError

STEP_COLUMNS = ["run_id", "rank", "world_size", "step", "start_time", "end_time", "tokens", "samples",
                "training_flops", "hardware_flops", "trailing"]
BREAKDOWN_KEYS = ["kind", "phase", "category", "module", "op", "training"]
AGGREGATE_ROWS = 1 << 19  # breakdown rows buffered before one group-by


def exact_sum(array) -> int:
    """Exact sum of a non-negative int64 array (nulls count 0), in a Python int."""
    values = pc.fill_null(array, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if values.size == 0:
        return 0
    high, low = values >> 32, values & 0xFFFFFFFF
    return (int(high.sum(dtype=np.int64)) << 32) + int(low.sum(dtype=np.int64))


def _hi_lo(table: pa.Table) -> pa.Table:
    value = table.column("value")
    return table.append_column("hi", pc.shift_right(value, 32)).append_column(
        "lo", pc.bit_wise_and(value, pa.scalar(0xFFFFFFFF, pa.int64())))


class _StepTotals:
    """Streaming totals of the steps table."""

    def __init__(self) -> None:
        self.training = self.hardware = 0
        self.trailing = 0  # FLOPs of rows marked trailing (work after the last optimizer step)
        self.tokens: int | None = None
        self.samples: int | None = None
        self.steps_by_run: dict[str, set[int]] = {}
        self.ranks: set[int] = set()
        self.world_size = 0
        self.first: float | None = None
        self.last: float | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self.training += exact_sum(batch.column("training_flops"))
        self.hardware += exact_sum(batch.column("hardware_flops"))
        for name in ("tokens", "samples"):
            column = batch.column(name)
            if column.null_count < len(column):
                setattr(self, name, (getattr(self, name) or 0) + exact_sum(column))
        # Trailing rows (null in older traces: not trailing) are counted, but are not steps.
        trailing = pc.fill_null(batch.column("trailing"), False)
        self.trailing += exact_sum(pc.filter(batch.column("hardware_flops"), trailing))
        steps = batch.column("step").to_numpy()
        run_ids = batch.column("run_id")
        is_step = pc.invert(trailing).to_numpy(zero_copy_only=False)
        for run_id in pc.unique(run_ids).to_pylist():
            mask = pc.equal(run_ids, run_id).to_numpy(zero_copy_only=False) & is_step
            self.steps_by_run.setdefault(run_id, set()).update(np.unique(steps[mask]).tolist())
        self.ranks.update(pc.unique(batch.column("rank")).to_pylist())
        self.world_size = max(self.world_size, pc.max(batch.column("world_size")).as_py())
        first, last = pc.min(batch.column("start_time")).as_py(), pc.max(batch.column("end_time")).as_py()
        self.first = first if self.first is None else min(self.first, first)
        self.last = last if self.last is None else max(self.last, last)


class _BreakdownTotals:
    """Streaming, exact group-by of the breakdown table into a Rollup."""

    def __init__(self, rollup: Rollup) -> None:
        self.rollup = rollup
        self.training = self.hardware = 0
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= AGGREGATE_ROWS:
            self.drain()

    def drain(self) -> None:
        if not self.pending:
            return
        table = _hi_lo(pa.Table.from_batches(self.pending))
        self.pending, self.pending_rows = [], 0
        grouped = table.group_by(BREAKDOWN_KEYS, use_threads=False).aggregate([("hi", "sum"), ("lo", "sum")])
        columns = [grouped.column(k).to_pylist() for k in BREAKDOWN_KEYS]
        sums = [(h << 32) + lo for h, lo in zip(grouped.column("hi_sum").to_pylist(),
                                                  grouped.column("lo_sum").to_pylist())]
        for (kind, phase, category, module, op, training), value in zip(zip(*columns), sums):
            self._book(kind, phase, category, module, op, training, value)

    def _book(self, kind, phase, category, module, op, training, value) -> None:
        rollup = self.rollup
        if kind == "flops":
            rollup.by_phase_category[(phase, category)] += value
            rollup.by_module[module] += value
            rollup.by_op[op] += value
            self.hardware += value
            if training:
                rollup.by_module_training[module] += value
                rollup.training_phases.add(phase)
                self.training += value
        elif kind == "calls":
            rollup.op_calls[op] += value
        elif kind == "uncounted":
            rollup.uncounted[op] += value
        elif kind == "dark_module":
            rollup.dark_modules[module] = op
        elif kind == "collective_calls" and hasattr(rollup, "collectives"):
            rollup.collectives[op] += value
        elif kind == "collective_bytes" and hasattr(rollup, "collective_bytes"):
            rollup.collective_bytes[op] += value


def _one_or_list(values):
    unique = list(dict.fromkeys(v for v in values if v is not None))
    if not unique:
        return None
    return unique[0] if len(unique) == 1 else unique


def recorded_base_model(traces: TraceSet) -> tuple[str | None, float | None]:
    """The base model (name, training FLOP) the runs recorded; TraceError if runs disagree."""
    names = {s.get("base_model") for s in traces.segments} - {None}
    flops = {s.get("base_model_flops") for s in traces.segments} - {None}
    if len(names) > 1 or len(flops) > 1:
        found = ", ".join(sorted(map(str, names | flops)))
        raise TraceError(f"flopcount: the runs under {traces.location} record different base models ({found}): "
                         "a modification has one base model; summarize each run's directory separately")
    return next(iter(names), None), next(iter(flops), None)


def summarize_traces(traces: TraceSet, *, module_depth: int | None = None, base_model: str | None = None,
                     base_model_flops: float | None = None) -> dict:
    """The summary dict (Meter.summary() keys) of an opened TraceSet."""
    segments = traces.segments
    if module_depth is None:
        depths = {s.get("module_depth") for s in segments} - {None}
        module_depth = min(depths) if depths else None
    steps = _StepTotals()
    resources = ResourceTally()  # time, device time and energy (flopcount.energy)
    for batch in iter_batches(traces, "steps", list(dict.fromkeys(STEP_COLUMNS + RESOURCE_COLUMNS))):
        steps.add(batch)
        resources.add_batch(batch)
    rollup = Rollup()
    breakdown = _BreakdownTotals(rollup)
    for batch in iter_batches(traces, "breakdown", BREAKDOWN_KEYS + ["value"]):
        breakdown.add(batch)
    breakdown.drain()
    if (breakdown.training, breakdown.hardware) != (steps.training, steps.hardware):
        raise TraceError(f"flopcount: the steps and breakdown tables under {traces.location} disagree "
                         f"(training {steps.training} vs {breakdown.training}, hardware {steps.hardware} vs "
                         f"{breakdown.hardware} FLOPs): run `flopcount verify`")
    rollup.steps = sum(len(s) for s in steps.steps_by_run.values())
    rollup.trailing_flops = steps.trailing
    rollup.tokens, rollup.samples = steps.tokens, steps.samples
    rollup.world_size = max([steps.world_size] + [s.get("world_size", 1) for s in segments])
    rollup.ranks = steps.ranks or {s["rank"] for s in segments}
    rollup.first_time, rollup.last_time = steps.first, steps.last
    summary = rollup.summary(module_depth)
    summary.update(_rank_integrity(traces))
    summary["meter_errors"] = _meter_errors(traces)
    recorded_name, recorded_flops = recorded_base_model(traces)
    if base_model is None and base_model_flops is None:
        base_model, base_model_flops = recorded_name, recorded_flops
    summary.update(
        run_id=_one_or_list(traces.run_ids), backend=_one_or_list(s.get("backend") for s in segments),
        base_model=base_model, rank=next(iter(rollup.ranks)) if len(rollup.ranks) == 1 else None,
        module_depth=module_depth, torch_version=_one_or_list(s.get("torch_version") for s in segments))
    summary.update(resources_summary(resources, summary["training_flops"]))
    hardware = _one_or_list(json.dumps(s.get("hardware"), sort_keys=True) for s in segments if s.get("hardware"))
    hardware = [json.loads(h) for h in hardware] if isinstance(hardware, list) else (
        json.loads(hardware) if hardware else {})  # {}: not recorded (never this machine's)
    return add_method_and_compliance(summary, base_model=base_model, base_model_flops=base_model_flops,
                                     hardware=hardware)


def _meter_errors(traces: TraceSet) -> dict:
    """Failures inside the meter's hooks that the ranks recorded at close (Meter.summary's
    ``meter_errors``), added over ranks and segments; the first message of each kind kept."""
    out: dict = {}
    closes = [e for t in traces.traces for entries in t.manifests.values() for e in entries if e["type"] == "close"]
    for entry in closes:
        for kind, value in (entry.get("meter_errors") or {}).items():
            seen = out.setdefault(kind, {"count": 0, "first": value.get("first")})
            seen["count"] += int(value.get("count", 0))
    return dict(sorted(out.items()))


def _rank_integrity(traces: TraceSet) -> dict:
    """Missing and unfinished ranks of every trace dir (flopcount.trace.integrity.rank_integrity)."""
    from .trace.integrity import rank_integrity

    found = [rank_integrity(t.manifests, t.name if len(traces.traces) > 1 else "") for t in traces.traces]
    return {"missing_ranks": sorted({r for f in found for r in f["missing_ranks"]}),
            "unfinished_ranks": sorted({r for f in found for r in f["unfinished_ranks"]}),
            "rank_problems": [p for f in found for p in f["rank_problems"]]}


def summarize(location, *, module_depth: int | None = None, base_model: str | None = None,
              base_model_flops: float | None = None) -> dict:
    """Summary of the traces at ``location`` (a trace dir, or a project dir of several runs).

    The dict has the keys of ``Meter.summary()``; see this module's docstring for what they mean
    across ranks and runs. Raises TraceError (a ValueError) for unusable input.
    """
    return summarize_traces(open_traces(location), module_depth=module_depth, base_model=base_model,
                            base_model_flops=base_model_flops)


def step_series(traces: TraceSet) -> list[tuple[str, int, int]]:
    """(run_id, step, training FLOPs of all ranks) per step, runs in start order: for plots."""
    per_step: Counter = Counter()
    for batch in iter_batches(traces, "steps", ["run_id", "step", "training_flops"]):
        table = pa.Table.from_batches([batch])
        grouped = _hi_lo(table.rename_columns(["run_id", "step", "value"])).group_by(
            ["run_id", "step"], use_threads=False).aggregate([("hi", "sum"), ("lo", "sum")])
        for run_id, step, hi, lo in zip(*(grouped.column(c).to_pylist()
                                          for c in ("run_id", "step", "hi_sum", "lo_sum"))):
            per_step[(run_id, step)] += (hi << 32) + lo
    starts = {}
    for segment in traces.segments:
        starts[segment["run_id"]] = min(starts.get(segment["run_id"], segment["started"]), segment["started"])
    return [(run, step, flops) for (run, step), flops in
            sorted(per_step.items(), key=lambda kv: (starts.get(kv[0][0], 0), kv[0][0], kv[0][1]))]
