"""Roll-ups of written traces across steps, ranks and runs: ``flopcount summarize DIR``.

The result has the same keys as ``Meter.summary()``: both are built by ``summarize_batches``
from batches of the trace tables (trace/schema.py), the meter's from its closed steps
(``LiveTotals``), this one from the written parts. Across ranks and runs the keys mean:

- totals (``training_flops``, ``by_phase``, ``by_module``, ...) add up every rank of every run:
  a project dir holding several runs on one base model is one modification;
- ``steps`` is the number of distinct optimizer steps of each run, added over runs (ranks of
  one step count once; rows marked ``trailing`` are not steps, their FLOPs are in the totals
  and in ``trailing_flops``); ``tokens`` and ``samples`` add up the per-rank counts;
- ``run_id``, ``rank``, ``backend`` and ``torch_version`` are single values when all runs agree,
  else lists (``rank`` is None for several ranks); ``world_size`` is the largest recorded.

Parts are streamed in record batches and every count is summed exactly (flopcount/exact.py:
int64 values as 32-bit limbs, so no int64 sum overflows), so memory does not grow with the trace size.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .accounting import StepWindow
from .compliance import add_method_and_compliance
from .conventions import CATEGORIES, EXCLUDED_PHASES, NO_MODULE, ROOT_MODULE, TRAINING_PHASES
from .exact import LIMB_AGGREGATES, exact_sum, exact_sums_at, grouped_sums, with_limbs
from .resources import RESOURCE_COLUMNS, ResourceTally, resources_summary
from .trace.arrays import arrow_array, arrow_scalar, group_by, to_numpy
from .trace.integrity import rank_integrity
from .trace.reader import TraceSet, iter_batches, open_traces
from .trace.schema import column_names
from .trace.step_rows import STEP_KEY, step_starts
from .trace.storage import TraceError

SUMMARY_SCHEMA = "flopcount.summary/1"
# The columns the totals read: of ``steps`` (with the time and energy of resources/tally.py) and of ``breakdown``.
STEP_COLUMNS = list(dict.fromkeys(column_names("steps", "run", "step", "counts", "totals", "ops") + RESOURCE_COLUMNS))
BREAKDOWN_KEYS = column_names("breakdown", "key")
AGGREGATE_ROWS = 1 << 19  # breakdown rows buffered before one group-by
# Arrow scalars for the compute functions: a Python value there would import pandas (trace/arrays.py).
FALSE = arrow_scalar(False, pa.bool_())


class _StepTotals:
    """Streaming totals of the steps table."""

    def __init__(self) -> None:
        self.training = self.hardware = 0
        self.trailing = 0  # FLOPs of rows marked trailing (work after the last optimizer step)
        self.collective_calls = self.collective_bytes = 0
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
        self.collective_calls += exact_sum(batch.column("collective_calls"))
        self.collective_bytes += exact_sum(batch.column("collective_bytes"))
        for name in ("tokens", "samples"):
            column = batch.column(name)
            if column.null_count < len(column):
                setattr(self, name, (getattr(self, name) or 0) + exact_sum(column))
        # Trailing rows (null in older traces: not trailing) are counted, but are not steps.
        trailing = pc.fill_null(batch.column("trailing"), FALSE)
        self.trailing += exact_sum(pc.filter(batch.column("hardware_flops"), trailing))
        steps = to_numpy(batch.column("step"))
        run_ids = batch.column("run_id")
        is_step = to_numpy(pc.invert(trailing))
        for run_id in pc.unique(run_ids).to_pylist():
            mask = to_numpy(pc.equal(run_ids, arrow_scalar(run_id, pa.string()))) & is_step
            self.steps_by_run.setdefault(run_id, set()).update(np.unique(steps[mask]).tolist())
        self.ranks.update(pc.unique(batch.column("rank")).to_pylist())
        self.world_size = max(self.world_size, pc.max(batch.column("world_size")).as_py())
        first, last = pc.min(batch.column("start_time")).as_py(), pc.max(batch.column("end_time")).as_py()
        self.first = first if self.first is None else min(self.first, first)
        self.last = last if self.last is None else max(self.last, last)

    @property
    def steps(self) -> int:
        return sum(len(s) for s in self.steps_by_run.values())


class _KeyTotals:
    """Streaming, exact group-by of the breakdown table: totals by phase and category, module, op."""

    def __init__(self, aggregate_rows: int) -> None:
        self.aggregate_rows = aggregate_rows
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0
        self.training = self.hardware = 0
        self.training_phases: set[str] = set()  # phases of rows marked training
        self.by_phase_category: defaultdict = defaultdict(int)
        self.by_module: defaultdict = defaultdict(int)
        self.by_module_training: defaultdict = defaultdict(int)
        self.by_op: defaultdict = defaultdict(int)
        self.op_calls: Counter = Counter()
        self.uncounted: Counter = Counter()
        self.collectives: Counter = Counter()
        self.collective_bytes: Counter = Counter()
        self.dark_modules: dict = {}  # module name -> class name (capture/dark.py)

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        if self.pending_rows >= self.aggregate_rows:
            self.drain()

    def drain(self) -> None:
        if not self.pending:
            return
        table = with_limbs(pa.Table.from_batches(self.pending).select(BREAKDOWN_KEYS + ["value"]))
        self.pending, self.pending_rows = [], 0
        grouped = group_by(table, BREAKDOWN_KEYS, LIMB_AGGREGATES)
        columns = [grouped.column(k).to_pylist() for k in BREAKDOWN_KEYS]
        for (kind, phase, category, module, op, training), value in zip(zip(*columns), grouped_sums(grouped)):
            if kind == "flops":
                self.by_phase_category[(phase, category)] += value
                self.by_module[module] += value
                self.by_op[op] += value
                self.hardware += value
                if training:
                    self.by_module_training[module] += value
                    self.training_phases.add(phase)
                    self.training += value
            elif kind == "calls":
                self.op_calls[op] += value
            elif kind == "uncounted":
                self.uncounted[op] += value
            elif kind == "dark_module":
                self.dark_modules[module] = op
            elif kind == "collective_calls":
                self.collectives[op] += value
            elif kind == "collective_bytes":
                self.collective_bytes[op] += value


class Totals:
    """Exact streaming totals of ``steps`` and ``breakdown`` record batches of any ranks and
    runs: FLOPs, calls and counts (exact.py), time and energy (resources/tally.py). Memory grows
    with the distinct keys, ranks and runs, not with the steps. The state of ``summarize_batches``."""

    def __init__(self, aggregate_rows: int = AGGREGATE_ROWS) -> None:
        self.steps = _StepTotals()
        self.keys = _KeyTotals(aggregate_rows)
        self.resources = ResourceTally()

    def add(self, steps: Iterable[pa.RecordBatch] = (), breakdown: Iterable[pa.RecordBatch] = ()) -> None:
        for batch in steps:
            self.steps.add(batch)
            self.resources.add_batch(batch)
        for batch in breakdown:
            self.keys.add(batch)


def truncate_module(name: str, depth: int | None) -> str:
    if depth is None or name in (ROOT_MODULE, NO_MODULE):
        return name
    return ".".join(name.split(".")[:depth])


def summarize_batches(steps: Iterable[pa.RecordBatch], breakdown: Iterable[pa.RecordBatch], *,
                      totals: Totals | None = None, module_depth: int | None = None,
                      training_phases: Iterable[str] = (), ranks: Iterable[int] = (), world_size: int = 0,
                      where: str = "the batches") -> dict:
    """The summary totals of ``steps`` and ``breakdown`` batches (trace/schema.py), added to
    ``totals`` (a live meter keeps one across calls; default: new): the one aggregation path of
    ``Meter.summary()`` and ``summarize()``, which add who ran it, integrity and compliance.

    ``training_phases``: phases that count toward ``training_flops`` besides the built-in ones
    and those the rows mark training (a live meter's declared phases); ``ranks`` and
    ``world_size``: recorded where the batches hold no row. TraceError when the two tables disagree."""
    totals = totals if totals is not None else Totals()
    totals.add(steps, breakdown)
    totals.keys.drain()
    rows, keys = totals.steps, totals.keys
    if (keys.training, keys.hardware) != (rows.training, rows.hardware):
        raise TraceError(f"flopcount: the steps and breakdown tables {where} disagree "
                         f"(training {rows.training} vs {keys.training}, hardware {rows.hardware} vs "
                         f"{keys.hardware} FLOPs): run `flopcount verify`")
    training = set(TRAINING_PHASES) | set(training_phases) | keys.training_phases
    by_phase: dict[str, int] = defaultdict(int)
    by_category: dict[str, int] = {c: 0 for c in CATEGORIES}
    training_by_category: dict[str, int] = {c: 0 for c in CATEGORIES}
    by_phase_category: dict[str, dict[str, int]] = defaultdict(dict)
    for (phase, category), f in sorted(keys.by_phase_category.items()):
        by_phase[phase] += f
        by_category[category] = by_category.get(category, 0) + f
        by_phase_category[phase][category] = f
        if phase in training:
            training_by_category[category] = training_by_category.get(category, 0) + f
    modules: dict[str, int] = defaultdict(int)
    modules_training: dict[str, int] = defaultdict(int)
    for name, f in keys.by_module.items():
        modules[truncate_module(name, module_depth)] += f
    for name, f in keys.by_module_training.items():
        modules_training[truncate_module(name, module_depth)] += f
    all_ranks = rows.ranks or set(ranks)
    summary = {
        "schema": SUMMARY_SCHEMA,
        "training_flops": sum(f for (p, _), f in keys.by_phase_category.items() if p in training),
        "hardware_flops": sum(keys.by_phase_category.values()),
        "gemm_training_flops": sum(training_by_category.get(c, 0) for c in ("matmul", "attention", "conv")),
        "by_phase": dict(by_phase),
        "by_category": by_category,
        "training_by_category": training_by_category,
        "by_phase_category": dict(by_phase_category),
        "by_module": dict(sorted(modules.items(), key=lambda kv: -kv[1])),
        "by_module_training": dict(sorted(modules_training.items(), key=lambda kv: -kv[1])),
        "by_op": {op: {"flops": keys.by_op.get(op, 0), "calls": keys.op_calls.get(op, 0)}
                  for op in sorted(set(keys.by_op) | set(keys.op_calls), key=lambda o: -keys.by_op.get(o, 0))},
        "steps": rows.steps,
        "trailing_flops": rows.trailing,
        "tokens": rows.tokens,
        "samples": rows.samples,
        "world_size": max(rows.world_size, world_size),
        "ranks": sorted(all_ranks),
        "uncounted_ops": dict(keys.uncounted.most_common()),
        "dark_modules": dict(sorted(keys.dark_modules.items())),
        "missing_ranks": [], "unfinished_ranks": [], "rank_problems": [],  # traces: summarize_traces
        "collective_calls": sum(keys.collectives.values()),
        "collective_bytes": sum(keys.collective_bytes.values()),
        "collectives": {op: {"calls": n, "bytes": keys.collective_bytes.get(op, 0)}
                        for op, n in sorted(keys.collectives.items(), key=lambda kv: -keys.collective_bytes[kv[0]])},
        "training_phases": sorted(training),
        "excluded_phases": sorted(EXCLUDED_PHASES | (set(by_phase) - training)),
        "start_time": rows.first,
        "end_time": rows.last,
    }
    summary.update(resources_summary(totals.resources, summary["training_flops"]))  # time, energy, estimate
    return summary


LIVE_WINDOW_STEPS = 64      # closed steps a live meter holds before adding them to its totals
LIVE_AGGREGATE_ROWS = 1 << 14  # its breakdown rows buffered before one group-by


class LiveTotals:
    """A live meter's totals over its closed steps, through the one aggregation path: each
    step's batches (``StepRecord.to_batches()``) wait in a StepWindow and join exact streaming
    ``Totals`` every LIVE_WINDOW_STEPS steps and before a total is read. Only the FLOP totals,
    read at every step by the budget guard, add the window's held sums instead.

    ``identity``: the values of the writer's columns in this rank's rows (run_id, rank,
    world_size, segment, device_name, device_count), set by the Meter."""

    def __init__(self) -> None:
        self.totals = Totals(LIVE_AGGREGATE_ROWS)
        self.window = StepWindow(LIVE_WINDOW_STEPS, self.fold)
        self.identity = {"run_id": "run", "rank": 0, "world_size": 1, "segment": 0, "device_name": None,
                         "device_count": None}

    def add(self, batches: dict) -> None:
        self.window.add(batches)

    def take(self) -> tuple[list[pa.RecordBatch], list[pa.RecordBatch]]:
        """The held steps as ([steps batch], [breakdown batch]), or two empty lists; empties the window."""
        if not len(self.window):
            return [], []
        batches = self.window.batches(self.identity)
        return [batches["steps"]], [batches["breakdown"]]

    def fold(self) -> None:
        self.totals.add(*self.take())

    @property
    def training_flops(self) -> int:
        return self.totals.steps.training + self.window.training_flops

    @property
    def hardware_flops(self) -> int:
        return self.totals.steps.hardware + self.window.hardware_flops

    def _folded(self) -> _StepTotals:
        self.fold()
        return self.totals.steps

    # What distributed.local_totals reads (job-wide totals): the steps table's sums.
    steps = property(lambda self: self._folded().steps)
    tokens = property(lambda self: self._folded().tokens)
    samples = property(lambda self: self._folded().samples)
    collective_calls = property(lambda self: self._folded().collective_calls)
    collective_bytes = property(lambda self: self._folded().collective_bytes)


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
    summary = summarize_batches(
        iter_batches(traces, "steps", STEP_COLUMNS), iter_batches(traces, "breakdown", BREAKDOWN_KEYS + ["value"]),
        module_depth=module_depth, ranks={s["rank"] for s in segments},
        world_size=max((s.get("world_size", 1) for s in segments), default=0), where=f"under {traces.location}")
    summary.update(_rank_integrity(traces))
    summary["meter_errors"] = _meter_errors(traces)
    recorded_name, recorded_flops = recorded_base_model(traces)
    if base_model is None and base_model_flops is None:
        base_model, base_model_flops = recorded_name, recorded_flops
    summary.update(
        run_id=_one_or_list(traces.run_ids), backend=_one_or_list(s.get("backend") for s in segments),
        base_model=base_model, rank=summary["ranks"][0] if len(summary["ranks"]) == 1 else None,
        module_depth=module_depth, torch_version=_one_or_list(s.get("torch_version") for s in segments))
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
    """(run_id, step, training FLOPs of all ranks) per step, runs in start order: for plots.

    A step's rows (several for a step over int64) and ranks are one point. A trailing row (work
    after a segment's last optimizer step) is a point of its own, before the step that takes its
    number after a resume (docs/traces.md, "Trailing work"): the trailing rows of one segment
    and number, of every rank, are one point."""
    per_step: Counter = Counter()
    for batch in iter_batches(traces, "steps", [*STEP_KEY, "training_flops"]):
        starts = step_starts(batch)
        keys = zip(*(batch.column(name).take(arrow_array(starts.tolist(), pa.int64())).to_pylist()
                     for name in ("run_id", "step", "trailing", "segment")))
        for (run_id, step, trailing, segment), flops in zip(keys, exact_sums_at(batch.column("training_flops"), starts)):
            # A step of every rank is one point; a trailing row's, per segment, sorts before that step.
            per_step[(run_id, step, 0 if trailing else 1, segment if trailing else 0)] += flops
    starts = {}
    for segment in traces.segments:
        starts[segment["run_id"]] = min(starts.get(segment["run_id"], segment["started"]), segment["started"])
    return [(run, step, flops) for (run, step, _, _), flops in
            sorted(per_step.items(), key=lambda kv: (starts.get(kv[0][0], 0), *kv[0]))]
