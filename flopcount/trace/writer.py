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
import re
import socket
import time
import uuid
import warnings
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from ..compliance.method import hardware_description
from ..conventions import BUILTIN_PHASES
from ..energy import energy_row
from ..distributed import rank_identity
from . import keys, lease, ledger
from . import manifest as mf
from .schema import (BREAKDOWN_SCHEMA, CATEGORY_COLUMNS, INT64_MAX, MANIFEST_DIR, PHASE_COLUMNS,
                     LEASE_DIR, STEPS_SCHEMA, TRACE_SCHEMA, manifest_path, part_path, writer_name)
from .spool import PendingPart, Spool, max_unwritten_steps
from .storage import check_writable, open_storage


def open_writer(meter, *, first_free: bool = False):
    """A writer for ``meter.out`` with ``write(record)`` and ``close(summary)``, or None.

    It holds the lease of its (trace dir, rank, process) from here to ``close`` (trace/lease.py): a
    second writer of the same rank fails here, before any step. ``first_free``: take the first free
    process slot of the rank instead (``flopcount run``: every metered process writes as its own)."""
    if meter.out is None:
        return None
    return TraceWriter(meter, first_free=first_free)


def default_run_id(location) -> str:
    """A trace dir's run id when the program gives none: its last path component (same on every rank)."""
    return os.path.basename(os.fspath(location).rstrip("/")) or "run"


class TraceWriter:
    def __init__(self, meter, *, first_free: bool = False) -> None:
        check_writable(meter.out)  # one line naming the path, before any training step
        self.storage = open_storage(meter.out)
        self.rank, self.world_size = int(meter.rank), int(meter.world_size)
        self.signer = keys.signer_from(getattr(meter, "signing_key", None))  # bad key: an error at entry
        ledger_location = getattr(meter, "ledger", None)
        self.ledger = ledger.check_location(ledger_location) if ledger_location is not None else None
        for rel in ("steps", "breakdown", MANIFEST_DIR, LEASE_DIR):
            self.storage.makedirs(rel)
        if first_free:
            self.process, self.lease = lease.acquire_first_free(self.storage, self.rank)
        else:
            self.process, self.lease = 0, lease.acquire(self.storage, self.rank, 0)
        try:
            self._open(meter)
        except BaseException:
            self.lease.release()
            raise

    def _open(self, meter) -> None:
        from .. import __version__

        self.flush_every = meter.flush_every
        self.energy = getattr(meter, "energy", None)  # devices and energy readers (flopcount.energy)
        self.key = mf.hmac_key()
        self.name = writer_name(self.rank, self.process)
        self._remove_leftover_temp_files()
        manifests = mf.load_manifests(self.storage)
        self.run_id = _resolve_run_id(meter.run_id, manifests, meter.out)
        own = manifests.get(manifest_path(self.rank, self.process), [])
        self.entries = list(own)
        self.lines = [mf.dumps([e]) for e in own]  # serialized once: each flush rewrites the whole file
        self.prev = own[-1]["hash"] if own else mf.GENESIS
        # Entry times: later than every entry of the dir now, so a digest taken before this segment
        # never covers its entries, whatever the clocks of other hosts say (manifest.py, the digest).
        self.last_t_us = max((mf.entry_time_us(e) for entries in manifests.values() for e in entries), default=0)
        self.segment = sum(e["type"] == "segment" for e in own)
        self.seq = sum(e["type"] == "part" for e in own)
        # Resume: this writer's steps continue after the last step it committed (rows are keyed by rank).
        last_steps = [e["last_step"] for e in own if e["type"] == "part"]
        self.first_step = max(last_steps) + 1 if last_steps else 0
        meter.run_id = self.run_id
        meter.step_index = max(meter.step_index, self.first_step)
        self.steps_written = 0
        self.closed = False
        self._digest = None
        # Parts not written yet (a storage fault): retried at each flush, bounded (spool.py).
        self.spool = Spool(self._commit, max_unwritten_steps(self.flush_every), self.storage.describe(), self.rank)
        self._reset_buffers()
        identity = rank_identity()
        self.segment_id = uuid.uuid4().hex
        self._append({
            "type": "segment", "manifest": mf.MANIFEST_SCHEMA, "schema": TRACE_SCHEMA, "run_id": self.run_id,
            "rank": self.rank, "process": self.process, "world_size": self.world_size, "segment": self.segment,
            "segment_id": self.segment_id, "first_step": meter.step_index, "started": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), "takeover": _takeover(self.lease.takeover),
            "flopcount_version": __version__, "torch_version": _torch_version(),
            "python_version": platform.python_version(), "hardware": hardware_description(),
            "local_rank": identity["local_rank"], "job_id": identity["job_id"],
            "backend": meter.backend, "base_model": meter.base_model, "base_model_flops": meter.base_model_flops,
            "module_depth": meter.module_depth, "flush_every": self.flush_every,
            "energy": self.energy.describe() if self.energy is not None else None,
        })

    def _remove_leftover_temp_files(self) -> None:
        """Temp files of a killed writer of this (rank, process): nobody else writes its names."""
        own = re.compile(rf"^{re.escape(self.name)}(-\d{{6}}\.parquet|\.jsonl)\.tmp-\d+$")
        for directory in ("steps", "breakdown", MANIFEST_DIR):
            for name in self.storage.listdir(directory):
                if own.match(name):
                    self.storage.remove(f"{directory}/{name}")

    @property
    def digest(self) -> str | None:
        """The trace digest of the whole trace dir as this writer last saw it (after its close: the
        digest to record; `flopcount verify --digest` checks it later)."""
        if self._digest is None or not self.closed:
            from .reader import open_traces

            self._digest = open_traces(self.storage.location).digest
        return self._digest

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
            bool(getattr(record, "trailing", False)),
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
        """Flush, then append the close entry; never raises a storage fault (the missing close is
        then the finding). Releases the lease whatever happens."""
        try:
            self.flush()
            entry = {"type": "close", "segment": self.segment, "steps": self.steps_written,
                     "training_flops": summary.get("training_flops"),
                     "hardware_flops": summary.get("hardware_flops"), "ended": time.time(),
                     "unwritten": self.spool.unwritten(), "meter_errors": summary.get("meter_errors") or {}}
            try:
                self._append(entry)
                close_written = True
            except Exception as exc:  # storage fault: reported below
                self.spool.last_fault, close_written = exc, False
            self.spool.report_exit(close_written)
            if close_written:
                self.closed = True
                if self.ledger is not None:
                    self._record_in_ledger()
        finally:
            self.lease.release()

    def _record_in_ledger(self) -> None:
        """Append the closing digest to the ledger; a ledger fault warns, never breaks the run."""
        try:
            ledger.append(self.ledger, {"dir": _location(self.storage), "run_id": self.run_id, "rank": self.rank,
                                        "process": self.process, "segment_id": self.segment_id,
                                        "digest": self.digest, "time": time.time()})
        except Exception as e:
            warnings.warn(f"flopcount: could not append the digest to the ledger {self.ledger}: {e}", stacklevel=2)

    # ---- flushing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand the buffered steps to the spool and write every part it holds. Never raises a
        storage fault: failed parts stay in memory (bounded) and are retried (spool.py)."""
        if self.rows:
            first, last = self.rows[0][4], self.rows[-1][4]
            steps = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(zip(*self.rows), STEPS_SCHEMA)],
                                         schema=STEPS_SCHEMA)
            breakdown = self._breakdown_table(first, last)
            files = {name: (_parquet_bytes(table), table.num_rows)
                     for name, table in (("steps", steps), ("breakdown", breakdown))}
            self.spool.add(PendingPart(first, last, len(self.rows), files))
            self._reset_buffers()
        self.spool.drain()

    def _commit(self, part: PendingPart) -> None:
        """Write one part's files and its manifest entry (the spool calls this; raises on a fault)."""
        entry = {"type": "part", "seq": self.seq, "segment": self.segment, "first_step": part.first_step,
                 "last_step": part.last_step, "rows": part.rows, "written": time.time()}
        for name, (data, rows) in part.files.items():
            rel = part_path(name, self.rank, self.seq, self.process)
            self.storage.write_atomic(rel, data)
            entry[name] = {"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                           "rows": rows}
        self._append(entry)
        self.steps_written += part.rows
        self.seq += 1

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
        t_us = max(int(time.time() * 1e6), self.last_t_us + 1)  # strictly increasing along the chain
        sealed = mf.seal(dict(entry, t=t_us / 1e6), self.prev, self.key, self.signer)
        line = mf.dumps([sealed])
        # In memory only once written: a failed write (storage fault) leaves the chain as it was.
        self.storage.write_atomic(manifest_path(self.rank, self.process), b"".join(self.lines) + line)
        self.entries.append(sealed)
        self.lines.append(line)
        self.prev, self.last_t_us = sealed["hash"], mf.entry_time_us(sealed)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _takeover(holder: dict | None) -> dict | None:
    """The dead holder of a lease this writer took over, as recorded in its segment entry."""
    if not holder:
        return None
    return {k: holder.get(k) for k in ("host", "pid", "started", "started_utc", "writer") if k in holder} or {
        "unreadable": True}


def _location(storage) -> str:
    location = storage.location
    return location if "://" in location else os.path.abspath(location)


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
