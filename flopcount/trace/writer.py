"""Trace writer: buffers closed steps and flushes Parquet parts plus a manifest entry every N steps.

Each flush writes a complete ``steps`` part and ``breakdown`` part (temp file, fsync, atomic
rename), then rewrites the rank's manifest atomically with a new chained entry. A part counts as
written once its manifest entry is; a part left unlisted by a crash between the two writes is
ignored by readers and overwritten by the next segment, which reuses its sequence number.
"""
from __future__ import annotations

import hashlib
import io
import os
import platform
import time
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from ..compliance.method import hardware_description
from ..conventions import BUILTIN_PHASES
from ..energy import energy_row
from ..distributed import rank_identity
from . import manifest as mf
from .schema import (BREAKDOWN_SCHEMA, CATEGORY_COLUMNS, INT64_MAX, MANIFEST_DIR, PHASE_COLUMNS,
                     STEPS_SCHEMA, TRACE_SCHEMA, manifest_path, part_path)
from .storage import open_storage


def open_writer(meter):
    """A writer for ``meter.out`` with ``write(record)`` and ``close(summary)``, or None."""
    if meter.out is None:
        return None
    return TraceWriter(meter)


def default_run_id(location) -> str:
    """A trace dir's run id when the program gives none: its last path component (same on every rank)."""
    return os.path.basename(os.fspath(location).rstrip("/")) or "run"


class TraceWriter:
    def __init__(self, meter) -> None:
        from .. import __version__

        self.storage = open_storage(meter.out)
        self.rank, self.world_size = int(meter.rank), int(meter.world_size)
        self.flush_every = meter.flush_every
        self.energy = getattr(meter, "energy", None)  # devices and energy readers (flopcount.energy)
        self.key = mf.hmac_key()
        for rel in ("steps", "breakdown", MANIFEST_DIR):
            self.storage.makedirs(rel)
        manifests = mf.load_manifests(self.storage)
        self.run_id = _resolve_run_id(meter.run_id, manifests, meter.out)
        own = manifests.get(manifest_path(self.rank), [])
        self.entries = list(own)
        self.prev = own[-1]["hash"] if own else mf.GENESIS
        self.segment = sum(e["type"] == "segment" for e in own)
        self.seq = sum(e["type"] == "part" for e in own)
        # Resume: this rank's steps continue after the last step it committed (rows are keyed by rank).
        last_steps = [e["last_step"] for e in own if e["type"] == "part"]
        self.first_step = max(last_steps) + 1 if last_steps else 0
        meter.run_id = self.run_id
        meter.step_index = max(meter.step_index, self.first_step)
        self.steps_written = 0
        self._reset_buffers()
        identity = rank_identity()
        self._append({
            "type": "segment", "schema": TRACE_SCHEMA, "run_id": self.run_id, "rank": self.rank,
            "world_size": self.world_size, "segment": self.segment, "first_step": meter.step_index,
            "started": time.time(), "flopcount_version": __version__, "torch_version": _torch_version(),
            "python_version": platform.python_version(), "hardware": hardware_description(),
            "local_rank": identity["local_rank"], "job_id": identity["job_id"],
            "backend": meter.backend, "base_model": meter.base_model, "base_model_flops": meter.base_model_flops,
            "module_depth": meter.module_depth, "flush_every": self.flush_every,
            "energy": self.energy.describe() if self.energy is not None else None,
        })

    def _reset_buffers(self) -> None:
        self.rows: list[tuple] = []
        self.window_flops: defaultdict = defaultdict(int)   # (phase, category, module, op) -> FLOPs
        self.window_calls: Counter = Counter()              # (op, phase) -> calls
        self.window_uncounted: Counter = Counter()
        self.window_dark: Counter = Counter()  # (module, class) -> steps in which it was dark
        self.window_collectives: Counter = Counter()
        self.window_collective_bytes: Counter = Counter()
        self.window_training: dict[str, bool] = {}
        self.window_hardware = 0

    # ---- the Meter's interface -------------------------------------------------------------
    def write(self, record) -> None:
        hardware = record.hardware_flops
        if hardware > INT64_MAX:
            raise ValueError(f"flopcount: step {record.step} of rank {self.rank} has {hardware} FLOPs, "
                             "more than a trace column holds (2**63-1); close steps more often")
        if self.window_hardware + hardware > INT64_MAX:
            self.flush()  # keep every breakdown sum inside int64
        phases = record.phase_totals()
        categories = record.category_totals()
        self.rows.append((
            self.run_id, self.rank, self.world_size, self.segment, record.step, record.start_time,
            record.end_time, record.tokens, record.samples, record.training_flops, hardware,
            *[phases.get(phase, 0) for phase in PHASE_COLUMNS],
            sum(f for phase, f in phases.items() if phase not in BUILTIN_PHASES),
            *[categories.get(category, 0) for category in CATEGORY_COLUMNS],
            sum(record.uncounted.values()),
            sum(getattr(record, "collectives", {}).values()), sum(getattr(record, "collective_bytes", {}).values()),
            *energy_row(getattr(record, "energy", None), self.energy),
        ))
        for key, flops in record.flops.items():
            self.window_flops[key] += flops
        for phase in phases:
            self.window_training[phase] = phase in record.training_phases
        self.window_calls.update(record.calls)
        self.window_uncounted.update(record.uncounted)
        self.window_dark.update(getattr(record, "dark_modules", {}).items())
        self.window_collectives.update(getattr(record, "collectives", {}))
        self.window_collective_bytes.update(getattr(record, "collective_bytes", {}))
        self.window_hardware += hardware
        if len(self.rows) >= self.flush_every:
            self.flush()

    def close(self, summary: dict) -> None:
        self.flush()
        self._append({"type": "close", "segment": self.segment, "steps": self.steps_written,
                      "training_flops": summary.get("training_flops"),
                      "hardware_flops": summary.get("hardware_flops"), "ended": time.time()})

    # ---- flushing -----------------------------------------------------------------------------
    def flush(self) -> None:
        if not self.rows:
            return
        first, last = self.rows[0][4], self.rows[-1][4]
        steps = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(zip(*self.rows), STEPS_SCHEMA)],
                                     schema=STEPS_SCHEMA)
        breakdown = self._breakdown_table(first, last)
        entry = {"type": "part", "seq": self.seq, "segment": self.segment, "first_step": first, "last_step": last,
                 "rows": len(self.rows), "written": time.time()}
        for name, table in (("steps", steps), ("breakdown", breakdown)):
            data = _parquet_bytes(table)
            rel = part_path(name, self.rank, self.seq)
            self.storage.write_atomic(rel, data)
            entry[name] = {"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                           "rows": table.num_rows}
        self._append(entry)
        self.steps_written += len(self.rows)
        self.seq += 1
        self._reset_buffers()

    def _breakdown_table(self, first: int, last: int) -> pa.Table:
        rows = [("flops", phase, category, module, op, self.window_training.get(phase, False), flops)
                for (phase, category, module, op), flops in self.window_flops.items()]
        rows += [("calls", phase, None, None, op, None, n) for (op, phase), n in self.window_calls.items()]
        rows += [("uncounted", None, None, None, op, None, n) for op, n in self.window_uncounted.items()]
        rows += [("dark_module", None, None, module, cls, None, n) for (module, cls), n in self.window_dark.items()]
        rows += [("collective_calls", None, None, None, op, None, n) for op, n in self.window_collectives.items()]
        rows += [("collective_bytes", None, None, None, op, None, n)
                 for op, n in self.window_collective_bytes.items()]
        n = len(rows)
        kind, phase, category, module, op, training, value = zip(*rows) if rows else ([],) * 7
        columns = [[self.run_id] * n, [self.rank] * n, [self.segment] * n, [first] * n, [last] * n,
                   kind, phase, category, module, op, training, value]
        return pa.Table.from_arrays([pa.array(list(c), type=f.type) for c, f in zip(columns, BREAKDOWN_SCHEMA)],
                                    schema=BREAKDOWN_SCHEMA)

    def _append(self, entry: dict) -> None:
        sealed = mf.seal(entry, self.prev, self.key)
        self.entries.append(sealed)
        self.storage.write_atomic(manifest_path(self.rank), mf.dumps(self.entries))
        self.prev = sealed["hash"]


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _torch_version() -> str:
    import torch

    return torch.__version__


def _resolve_run_id(requested: str | None, manifests: dict, location) -> str:
    recorded = sorted({e["run_id"] for entries in manifests.values() for e in entries if e["type"] == "segment"})
    if requested is None:
        return recorded[0] if recorded else default_run_id(location)
    if recorded and requested not in recorded:
        raise ValueError(f"flopcount: {os.fspath(location)} holds run {recorded[0]!r}, not {requested!r}: "
                         f"pass run_id={recorded[0]!r} to resume it, or write the new run to another directory")
    return str(requested)
