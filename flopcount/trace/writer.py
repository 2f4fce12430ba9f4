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
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..accounting import StepRecord, StepWindow
from ..compliance.method import hardware_description
from ..distributed import rank_identity
from ..errors import BadInput
from . import keys, lease
from . import ledger as ledger_mod
from . import manifest as mf
from .reader import open_traces
from .schema import LEASE_DIR, MANIFEST_DIR, TRACE_SCHEMA, manifest_path, part_path, writer_name
from .spool import PendingPart, Spool, max_unwritten_steps
from .storage import check_writable, open_storage


@dataclass(frozen=True)
class WriterIdentity:
    """Who writes (the run, the rank and its devices) and what the segment entry records about
    the run. ``run_id`` None: the run the dir records, else the dir's name; ``first_step``: the
    writer's first step number at the earliest (a resumed trace continues after its last step)."""

    rank: int = 0
    world_size: int = 1
    run_id: str | None = None
    first_step: int = 0
    device_name: str | None = None
    device_count: int | None = None
    energy: dict | None = None  # what is metered (resources EnergyMeter.describe())
    backend: str | None = None
    base_model: str | None = None
    base_model_flops: float | None = None
    module_depth: int | None = None


def default_run_id(location) -> str:
    """A trace dir's run id when the program gives none: its last path component (same on every rank)."""
    return os.path.basename(os.fspath(location).rstrip("/")) or "run"


class TraceWriter:
    """Writes one (trace dir, rank, process): ``write`` closed steps, ``flush`` parts, ``close``.

    ``location``: the trace dir (a path or an fsspec URI), checked writable here. It holds the
    lease of its (trace dir, rank, process) from here to ``close`` (trace/lease.py): a second
    writer of the same rank fails here, before any step. ``first_free``: take the first free
    process slot of the rank instead (``flopcount run``: every metered process writes as its own).
    ``signing_key``: an Ed25519 private key that signs every manifest entry; ``ledger``: where
    the closing digest is appended. After construction, ``run_id`` and ``first_step`` are the
    run and the first step number this writer writes."""

    def __init__(self, location, identity: WriterIdentity, flush_every: int, *, first_free: bool = False,
                 signing_key=None, ledger=None) -> None:
        check_writable(location)  # one line naming the path, before any training step
        self.storage = open_storage(location)
        self.identity = identity
        self.rank, self.world_size = int(identity.rank), int(identity.world_size)
        self.flush_every = flush_every
        self.signer = keys.signer_from(signing_key)  # bad key: an error at entry
        self.ledger = ledger_mod.check_location(ledger) if ledger is not None else None
        for rel in ("steps", "breakdown", MANIFEST_DIR, LEASE_DIR):
            self.storage.makedirs(rel)
        if first_free:
            self.process, self.lease = lease.acquire_first_free(self.storage, self.rank)
        else:
            self.process, self.lease = 0, lease.acquire(self.storage, self.rank, 0)
        try:
            self._open(location)
        except BaseException:
            self.lease.release()
            raise

    def _open(self, location) -> None:
        from .. import __version__

        identity = self.identity
        self.key = mf.hmac_key()
        self.name = writer_name(self.rank, self.process)
        self._remove_leftover_temp_files()
        manifests = mf.load_manifests(self.storage)
        self.run_id = _resolve_run_id(identity.run_id, manifests, location)
        own = manifests.get(manifest_path(self.rank, self.process), [])
        self.entries = list(own)
        self.lines = [mf.dumps([e]) for e in own]  # serialized once: each flush rewrites the whole file
        self.prev = own[-1]["hash"] if own else mf.GENESIS
        # Entry times: later than every entry of the dir now, so a digest taken before this segment
        # never covers its entries, whatever the clocks of other hosts say (manifest.py, the digest).
        self.last_t_us = max((mf.entry_time_us(e) for entries in manifests.values() for e in entries), default=0)
        self.segment = sum(e["type"] == "segment" for e in own)
        self.seq = sum(e["type"] == "part" for e in own)
        # Resume: this writer's steps continue after the last step it committed (rows are keyed by
        # rank); a trailing row takes no step's number (mf.next_step).
        self.first_step = max([identity.first_step] + [mf.next_step(e) for e in own if e["type"] == "part"])
        # The values of this writer's columns in every row it writes (trace/schema.py).
        self.constants = {"run_id": self.run_id, "rank": self.rank, "world_size": self.world_size,
                          "segment": self.segment, "device_name": identity.device_name,
                          "device_count": identity.device_count}
        self.steps_written = 0  # optimizer steps in the parts committed (a trailing row is none)
        self.rows_written = 0   # their steps rows (a step over int64 FLOPs is several)
        self.closed = False  # the close entry is written
        self.finished = False  # close() was called: the lease is given back
        self._digest = None
        # Parts not written yet (a storage fault): retried at each flush, bounded (spool.py).
        self.spool = Spool(self._commit, max_unwritten_steps(self.flush_every), self.storage.describe(), self.rank)
        self.window = StepWindow(self.flush_every, self.flush)
        ranks = rank_identity()
        self.segment_id = uuid.uuid4().hex
        self._append({
            "type": "segment", "manifest": mf.MANIFEST_SCHEMA, "schema": TRACE_SCHEMA, "run_id": self.run_id,
            "rank": self.rank, "process": self.process, "world_size": self.world_size, "segment": self.segment,
            "segment_id": self.segment_id, "first_step": self.first_step, "started": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), "takeover": _takeover(self.lease.takeover),
            "flopcount_version": __version__, "torch_version": _torch_version(),
            "python_version": platform.python_version(), "hardware": hardware_description(),
            "local_rank": ranks["local_rank"], "job_id": ranks["job_id"],
            "backend": identity.backend, "base_model": identity.base_model,
            "base_model_flops": identity.base_model_flops, "module_depth": identity.module_depth,
            "flush_every": self.flush_every, "energy": identity.energy,
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
            self._digest = open_traces(self.storage.location).digest
        return self._digest

    # ---- the Meter's interface -------------------------------------------------------------
    def write(self, step) -> None:
        """Buffer one closed step: a StepRecord or its ``to_batches()``; every ``flush_every``
        steps (sooner if a breakdown sum would leave int64) they are flushed."""
        self.window.add(step.to_batches() if isinstance(step, StepRecord) else step)

    def close(self, summary: dict) -> None:
        """Flush, then append the close entry; never raises a storage fault (the missing close is
        then the finding). Releases the lease whatever happens. Once: a writer that gave its lease
        back never writes again (another writer may hold the files by then)."""
        if self.finished:
            return
        self.finished = True
        try:
            self.flush()
            entry = {"type": "close", "segment": self.segment, "steps": self.steps_written, "rows": self.rows_written,
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
            ledger_mod.append(self.ledger, {"dir": _location(self.storage), "run_id": self.run_id, "rank": self.rank,
                                        "process": self.process, "segment_id": self.segment_id,
                                        "digest": self.digest, "time": time.time()})
        except Exception as e:
            warnings.warn(f"flopcount: could not append the digest to the ledger {self.ledger}: {e}", stacklevel=2)

    # ---- flushing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Hand the buffered steps to the spool and write every part it holds. Never raises a
        storage fault: failed parts stay in memory (bounded) and are retried (spool.py)."""
        if len(self.window):
            rows = len(self.window)
            tables = self.window.batches(self.constants)
            steps = tables["steps"]
            first, last = steps.column("step")[0].as_py(), steps.column("step")[-1].as_py()
            # A trailing row carries the number of the step that follows it (Meter._close_step).
            next_step = last if steps.column("trailing")[-1].as_py() else last + 1
            files = {name: (_parquet_bytes(pa.Table.from_batches([batch])), batch.num_rows)
                     for name, batch in tables.items()}
            self.spool.add(PendingPart(first, last, rows, files, next_step))
        self.spool.drain()

    def _commit(self, part: PendingPart) -> None:
        """Write one part's files and its manifest entry (the spool calls this; raises on a fault)."""
        entry = {"type": "part", "seq": self.seq, "segment": self.segment, "first_step": part.first_step,
                 "last_step": part.last_step,
                 "next_step": part.last_step + 1 if part.next_step is None else part.next_step, "rows": part.rows, "written": time.time()}
        for name, (data, rows) in part.files.items():
            rel = part_path(name, self.rank, self.seq, self.process)
            self.storage.write_atomic(rel, data)
            entry[name] = {"file": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                           "rows": rows}
        self._append(entry)
        self.steps_written += entry["next_step"] - part.first_step  # its steps are numbered first_step, ..., next_step - 1
        self.rows_written += part.rows
        self.seq += 1

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
        raise BadInput(f"flopcount: {os.fspath(location)} holds run {recorded[0]!r}, not {requested!r}: "
                         f"pass run_id={recorded[0]!r} to resume it, or write the new run to another directory")
    return str(requested)
