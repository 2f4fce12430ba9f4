"""Totals over step rows of any number of ranks and runs: training time, device time, energy and
the per-step achieved FLOP/s (for the hardware cross-check)."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..hardware import ASSUMED_UTILISATION, DEFAULT_DTYPE, cross_check, quantiles
from .counters import NO_DEVICE, RAPL, RAPL_OTHER_RANK, UNAVAILABLE
from .prose import TIME_SOURCE, TIME_SOURCE_WITHOUT_DEVICES, coverage_text
from ..trace.arrays import arrow_array, arrow_scalar, group_by, to_numpy
from ..trace.schema import STEPS_SCHEMA
from ..trace.step_rows import step_starts
from .rows import RESOURCE_COLUMNS

J_PER_MWH = 3.6e9
J_PER_KWH = 3.6e6
SECONDS_PER_DAY = 86_400.0
RATE_SAMPLE = 50_000  # per-step MFU: a uniform sample of at most this many steps per device type
# Arrow scalars for the compute functions: a Python value there would import pandas (trace/arrays.py).
_FALSE, _ZERO_INT32 = arrow_scalar(False, pa.bool_()), arrow_scalar(0, pa.int32())
_NULL_STRING = arrow_scalar(None, pa.string())
_ROW_SCHEMA = pa.schema([STEPS_SCHEMA.field(c) for c in RESOURCE_COLUMNS])  # ResourceTally.add's one row


class _Sample:
    """A uniform sample without replacement of at most ``size`` values (bottom-k of random keys):
    every value while there are fewer, so small runs get exact quantiles; memory stays bounded."""

    def __init__(self, size: int = RATE_SAMPLE, seed: int = 0) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.values = np.empty(0)
        self.keys = np.empty(0)
        self.threshold = 1.0  # keys at or above it can no longer enter the bottom-k

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.float64)
        keys = self.rng.random(values.size)
        if self.threshold < 1.0:
            values, keys = values[keys < self.threshold], keys[keys < self.threshold]
        if values.size == 0:
            return
        self.values = np.concatenate([self.values, values])
        self.keys = np.concatenate([self.keys, keys])
        if self.values.size > 2 * self.size:  # trim now and then, not on every batch
            self._trim()

    def _trim(self) -> None:
        if self.values.size > self.size:
            keep = np.argpartition(self.keys, self.size - 1)[:self.size]
            self.values, self.keys = self.values[keep], self.keys[keep]
            self.threshold = float(self.keys.max())

    def tolist(self) -> list[float]:
        self._trim()
        return self.values.tolist()


@dataclass
class _RankTime:
    active_s: float = 0.0
    device_name: str | None = None
    device_count: int | None = None
    first: float | None = None
    last: float | None = None


@dataclass
class ResourceTally:
    """Training time, device time and energy over step rows of any number of ranks and runs.

    Fed record batches of the ``steps`` table (``add_batch``): the live meter's and the written
    traces' alike (summary.summarize_batches). Memory grows with ranks x runs, not with steps."""

    ranks: dict = field(default_factory=dict)                 # (run_id, rank) -> _RankTime
    device_seconds: defaultdict = field(default_factory=lambda: defaultdict(float))
    rates: dict = field(default_factory=dict)                 # device -> _Sample of FLOP/s per device
    rows: int = 0
    rows_without_devices: int = 0
    gpu_j: float = 0.0
    cpu_j: float = 0.0
    gpu_sources: Counter = field(default_factory=Counter)
    cpu_sources: Counter = field(default_factory=Counter)
    gpu_rows_missing: int = 0   # rows whose GPU figure is absent or covers fewer devices than used
    cpu_rows_missing: int = 0

    def _rank(self, run_id, rank, first, last, active_s, device_name, device_count) -> None:
        entry = self.ranks.setdefault((run_id, int(rank)), _RankTime())
        entry.active_s += active_s
        entry.first = first if entry.first is None else min(entry.first, first)
        entry.last = last if entry.last is None else max(entry.last, last)
        if device_name is not None and device_count:
            entry.device_name, entry.device_count = device_name, int(device_count)

    def _sample(self, device_name: str) -> _Sample:
        if device_name not in self.rates:
            self.rates[device_name] = _Sample(seed=len(self.rates))
        return self.rates[device_name]

    def add(self, run_id: str, rank: int, start: float, end: float, training_flops: int, *,
            device_name: str | None, device_count: int | None, gpu_j: float | None, gpu_source: str | None,
            gpu_devices: int | None, cpu_j: float | None, cpu_source: str | None, trailing: bool = False) -> None:
        """One step row of one rank, as a one-row batch through ``add_batch`` (the one arithmetic)."""
        row = {"run_id": run_id, "rank": rank, "start_time": start, "end_time": end, "training_flops": training_flops,
               "device_name": device_name, "device_count": device_count, "gpu_energy_j": gpu_j,
               "gpu_energy_source": gpu_source, "gpu_energy_devices": gpu_devices, "cpu_energy_j": cpu_j,
               "cpu_energy_source": cpu_source, "trailing": trailing}
        self.add_batch(pa.RecordBatch.from_pylist([row], schema=_ROW_SCHEMA))

    def add_batch(self, batch) -> None:
        """A record batch of the steps table with ``RESOURCE_COLUMNS`` (absent columns as nulls; a
        batch is usually one rank of one run) that holds every row of its steps (trace/reader.py
        and the live meter's window give whole steps). A step gives one per-step FLOP/s sample,
        from all its rows; a trailing row (work after the last optimizer step) counts in time,
        device time and energy, but is no step: it gives none."""
        n = batch.num_rows
        if n == 0:
            return
        column = batch.column

        def floats(name: str):  # nulls as NaN
            return to_numpy(column(name)).astype(np.float64, copy=False)

        def nulls(name: str):
            return to_numpy(column(name).is_null())

        def equal(name: str, value: str):
            return to_numpy(pc.fill_null(pc.equal(column(name), arrow_scalar(value, pa.string())), _FALSE))

        start = floats("start_time")
        duration = np.maximum(floats("end_time") - start, 0.0)
        count = np.nan_to_num(floats("device_count"))
        names = column("device_name")
        known = ~nulls("device_name") & (count > 0)
        runs, ranks = pc.unique(column("run_id")).to_pylist(), to_numpy(column("rank"))
        if len(runs) == 1 and ranks.min() == ranks.max():
            last = np.flatnonzero(known)[-1] if known.any() else None
            self._rank(runs[0], int(ranks[0]), float(start.min()), float(floats("end_time").max()),
                       float(duration.sum()), names[int(last)].as_py() if last is not None else None,
                       int(count[last]) if last is not None else None)
        else:
            self._ranks_grouped(batch, duration)
        self.rows += n
        self.rows_without_devices += int(n - known.sum())
        device_s = count * duration
        trailing = to_numpy(pc.fill_null(column("trailing"), _FALSE))  # null: older traces
        # One rate per step, not per row: a step over int64 FLOPs is several rows (step_rows.py).
        # Its rows share the rank's devices and ``trailing``; a trailing row is no step: no rate.
        starts = step_starts(batch)
        step_s = np.add.reduceat(device_s, starts)
        rate_ok = (known & ~trailing)[starts] & (step_s > 0)
        rates = np.divide(np.add.reduceat(floats("training_flops"), starts), step_s,
                          out=np.zeros(starts.size), where=rate_ok)
        device_names = (pc.unique(names if known.all() else pc.filter(names, known)).to_pylist()
                        if known.any() else [])
        for name in device_names:
            mask = known if len(device_names) == 1 else known & equal("device_name", name)
            self.device_seconds[name] += float(device_s[mask].sum())
            self._sample(name).add(rates[mask[starts] & rate_ok])
        def sources(name: str, counts: Counter, value: str):
            """Count the batch's sources; the rows whose source is ``value`` (a mask)."""
            found = {item["values"]: item["counts"]
                     for item in pc.value_counts(pc.fill_null(column(name), arrow_scalar(UNAVAILABLE, pa.string()))).to_pylist()}
            counts.update(found)
            if value not in found:
                return np.zeros(n, dtype=bool)
            return np.ones(n, dtype=bool) if len(found) == 1 else equal(name, value)

        no_gpu = sources("gpu_energy_source", self.gpu_sources, NO_DEVICE)
        other_rank = sources("cpu_energy_source", self.cpu_sources, RAPL_OTHER_RANK)
        gpu_j, cpu_j = floats("gpu_energy_j"), floats("cpu_energy_j")
        self.gpu_j += float(np.nansum(gpu_j))
        self.cpu_j += float(np.nansum(cpu_j))
        short = known & (np.nan_to_num(floats("gpu_energy_devices")) < count)
        gpu_missing = ~no_gpu & (np.isnan(gpu_j) | short)
        cpu_missing = np.isnan(cpu_j) & ~other_rank
        self.gpu_rows_missing += int(gpu_missing.sum())
        self.cpu_rows_missing += int(cpu_missing.sum())

    def _ranks_grouped(self, batch, duration) -> None:
        """Per-rank times of a batch that holds several ranks or runs."""
        column = batch.column
        known = pc.and_(pc.is_valid(column("device_name")), pc.greater(pc.fill_null(column("device_count"), _ZERO_INT32), _ZERO_INT32))
        table = pa.table({"run_id": column("run_id"), "rank": column("rank"), "start": column("start_time"),
                          "end": column("end_time"), "duration": arrow_array(duration.tolist(), pa.float64()),
                          "name": pc.if_else(known, column("device_name"), _NULL_STRING),
                          "count": column("device_count")})
        grouped = group_by(table, ["run_id", "rank"],
                           [("start", "min"), ("end", "max"), ("duration", "sum"), ("name", "max"), ("count", "max")])
        for run_id, rank, first, last, active, name, count in zip(*(grouped.column(c).to_pylist() for c in (
                "run_id", "rank", "start_min", "end_max", "duration_sum", "name_max", "count_max"))):
            self._rank(run_id, rank, first, last, active, name, count)

    @property
    def step_rates(self) -> dict[str, list[float]]:
        """Device type -> achieved training FLOP/s per device of each sampled step (all its rows)."""
        return {name: sample.tolist() for name, sample in self.rates.items()}

    # ---- results ------------------------------------------------------------------------
    def time_summary(self) -> dict:
        runs: dict[str, list] = defaultdict(list)
        for (run_id, _), entry in sorted(self.ranks.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            runs[run_id].append(entry)
        run_rows = []
        for run_id, entries in runs.items():
            start = min(e.first for e in entries)
            end = max(e.last for e in entries)
            devices: Counter = Counter()
            for e in entries:
                if e.device_name is not None:
                    devices[e.device_name] += e.device_count
            known = all(e.device_name is not None for e in entries)
            hardware_s = sum(e.active_s * e.device_count for e in entries) if known else None
            run_rows.append({"run_id": run_id, "ranks": len(entries), "start_time": start, "end_time": end,
                             "wall_clock_s": end - start, "hardware_s": hardware_s,
                             "hardware_days": hardware_s / SECONDS_PER_DAY if hardware_s is not None else None,
                             "devices": dict(devices)})
        wall = _union_length([(r["start_time"], r["end_time"]) for r in run_rows])
        hardware_s = (sum(r["hardware_s"] for r in run_rows)
                      if run_rows and all(r["hardware_s"] is not None for r in run_rows) else None)
        devices: dict[str, int] = {}
        for r in run_rows:  # the largest allocation of each device type in any one run
            for name, count in r["devices"].items():
                devices[name] = max(devices.get(name, 0), count)
        return {
            "wall_clock_s": wall, "wall_clock_days": wall / SECONDS_PER_DAY if wall is not None else None,
            "hardware_s": hardware_s,
            "hardware_days": hardware_s / SECONDS_PER_DAY if hardware_s is not None else None,
            "devices": devices, "device_count": sum(devices.values()) or None, "runs": run_rows,
            "source": TIME_SOURCE if hardware_s is not None else TIME_SOURCE_WITHOUT_DEVICES,
        }

    def energy_summary(self) -> dict:
        gpu_measured = sum(n for s, n in self.gpu_sources.items() if s not in (UNAVAILABLE, NO_DEVICE))
        cpu_measured = self.cpu_sources.get(RAPL, 0)
        gpu_j = self.gpu_j if gpu_measured else None
        cpu_j = self.cpu_j if cpu_measured else None
        total = None if gpu_j is None and cpu_j is None else (gpu_j or 0.0) + (cpu_j or 0.0)
        uses_gpu = any(s != NO_DEVICE for s in self.gpu_sources)
        complete = self.rows > 0 and not self.gpu_rows_missing and not self.cpu_rows_missing
        return {
            "gpu_j": gpu_j, "gpu_sources": dict(self.gpu_sources), "gpu_rows_missing": self.gpu_rows_missing,
            "cpu_j": cpu_j, "cpu_sources": dict(self.cpu_sources), "cpu_rows_missing": self.cpu_rows_missing,
            "rows": self.rows, "total_j": total,
            "total_kwh": total / J_PER_KWH if total is not None else None,
            "total_mwh": total / J_PER_MWH if total is not None else None,
            "complete": complete,
            "coverage": coverage_text(uses_gpu, gpu_j, cpu_j, complete),
        }


def _union_length(intervals: list[tuple[float, float]]) -> float | None:
    """Total length covered by possibly overlapping intervals (runs that ran at the same time)."""
    if not intervals:
        return None
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    return total + (current_end - current_start)


def resources_summary(tally: ResourceTally, training_flops: int, *, dtype: str | None = None,
                      utilisation: float | None = None) -> dict:
    """The ``time``, ``energy`` and ``hardware_estimate`` entries of a summary."""
    rates = {name: quantiles(values) for name, values in tally.step_rates.items() if values}
    return {"time": tally.time_summary(), "energy": tally.energy_summary(),
            "hardware_estimate": cross_check(training_flops, dict(tally.device_seconds), rates,
                                             dtype=dtype or DEFAULT_DTYPE,
                                             utilisation=utilisation or ASSUMED_UTILISATION)}
