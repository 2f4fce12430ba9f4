"""Reading traces: find the trace dirs under a location, stream their committed parts.

A location is a trace dir (it has ``manifest/``) or a project dir whose subdirectories (up to
three levels deep) are trace dirs. Only parts listed in a manifest are read: a part whose
manifest entry was never written (a crash between the two writes) was not committed. Reading
never modifies a file.

A writer's chain seen twice (a copied manifest file, a backup copy of a trace dir inside the
project dir: the same segment ids) is read once: the longest copy is kept, the others are
listed in ``TraceSet.duplicates`` (an integrity problem, trace/integrity.py) and never summed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from ..progress import progress
from . import manifest as mf
from .schema import (MANIFEST_DIR, SCHEMA_METADATA_KEY, TABLES, TRACE_SCHEMA, TRACE_SCHEMA_MAJOR,
                     manifest_path, schema_major)
from ..errors import BadInput
from .step_rows import whole_steps
from .storage import TraceError, open_storage, pa_errors

PROJECT_DEPTH = 3


@dataclass
class Trace:
    """One trace dir: its storage and every writer's manifest entries (``manifests``: without the
    copies of chains seen elsewhere; ``all_manifests``: every manifest file as found)."""

    storage: object
    manifests: dict[str, list[dict]]
    name: str = ""
    all_manifests: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def segments(self) -> list[dict]:
        return [e for entries in self.manifests.values() for e in entries if e["type"] == "segment"]

    @property
    def run_ids(self) -> list[str]:
        return sorted({e["run_id"] for e in self.segments})

    def parts(self, table: str) -> list[str]:
        return [e[table]["file"] for _, entries in sorted(self.manifests.items())
                for e in entries if e["type"] == "part" and e.get(table)]

    @property
    def digest(self) -> str | None:
        return mf.chain_head_digest(self.manifests)


@dataclass
class Duplicate:
    """A writer chain found twice: ``dropped`` (trace dir, manifest) is a copy of ``kept``'s."""

    kept: tuple[str, str]
    dropped: tuple[str, str]
    what: str  # run, rank and segment

    def describe(self) -> str:
        return (f"{self.what} is recorded twice: {self.dropped[0]}/{self.dropped[1]} repeats "
                f"{self.kept[0]}/{self.kept[1]} (a copied manifest or a backup copy of the run); "
                "it is counted once: remove the copy")


@dataclass
class TraceSet:
    location: str
    traces: list[Trace] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)

    @property
    def chains(self) -> list[list[dict]]:
        """Every writer's chain, each once."""
        return [entries for t in self.traces for entries in t.manifests.values() if entries]

    @property
    def digest(self) -> str | None:
        """The trace digest of everything at this location (manifest.py, "the trace digest")."""
        return mf.trace_digest(self.chains)

    @property
    def segments(self) -> list[dict]:
        return [s for t in self.traces for s in t.segments]

    @property
    def run_ids(self) -> list[str]:
        return sorted({r for t in self.traces for r in t.run_ids})


def open_traces(location) -> TraceSet:
    """The trace dirs at ``location``; TraceError (one line, naming the path) when there are none."""
    storage = open_storage(location)
    where = storage.describe()
    if not storage.is_dir():
        what = "is not a directory" if storage.exists("") else "does not exist"
        raise TraceError(f"flopcount: {where} {what}: pass a trace directory written by flopcount.meter(out=...)")
    found = []
    for trace_storage, name in _trace_dirs(storage, "", PROJECT_DEPTH):
        manifests = mf.load_manifests(trace_storage)
        found.append(Trace(trace_storage, dict(manifests), name, manifests))
    if not found:
        empty = "is empty" if not storage.listdir() else "holds no flopcount trace (no manifest/ directory)"
        raise TraceError(f"flopcount: {where} {empty}: pass a trace directory written by flopcount.meter(out=...)")
    if not any(entries for t in found for entries in t.all_manifests.values()):
        raise TraceError(f"flopcount: {where} holds no manifest entries (its trace files were removed?): "
                         "nothing to read; pass a trace directory written by flopcount.meter(out=...)")
    return TraceSet(where, found, _drop_duplicates(found, where))


def _drop_duplicates(traces: list[Trace], where: str) -> list[Duplicate]:
    """Keep each writer chain once (the longest copy; ties: the canonical file name, then the first
    path) and remove the other copies from ``Trace.manifests``. Copies share their segments'
    identity (run, writer, segment number and random segment id), re-hashed or not."""
    def label(trace):
        return os.path.join(where, trace.name) if trace.name else where

    chains = [(trace, rel, entries) for trace in traces for rel, entries in sorted(trace.all_manifests.items())
              if entries]
    chains.sort(key=lambda c: (-len(c[2]), not _canonical_name(c[1], c[2]), c[0].name, c[1]))
    owner: dict[tuple, tuple] = {}  # segment identity -> the kept chain holding it
    duplicates = []
    for trace, rel, entries in chains:
        segments = [_segment_identity(e) for e in entries if e["type"] == "segment"]
        kept = next((owner[s] for s in segments if s in owner), None)
        if kept is None:
            for s in segments:
                owner[s] = (trace, rel)
            continue
        del trace.manifests[rel]
        first = next((e for e in entries if e["type"] == "segment"), entries[0])
        what = (f"run {first.get('run_id')!r} rank {first.get('rank')} segment {first.get('segment')}"
                + (f" (id {first['segment_id'][:12]})" if first.get("segment_id") else ""))
        duplicates.append(Duplicate((label(kept[0]), kept[1]), (label(trace), rel), what))
    return duplicates


def _segment_identity(segment: dict) -> tuple:
    """What a copy of a segment keeps even when its entries were edited and re-hashed: the run,
    the writer, the segment number and its random id (older traces: its start time)."""
    return (segment["run_id"], segment["rank"], segment.get("process", 0), segment["segment"],
            segment.get("segment_id") or repr(segment["started"]))


def _canonical_name(rel: str, entries: list[dict]) -> bool:
    first = entries[0]
    return first["type"] == "segment" and rel == manifest_path(first["rank"], first.get("process", 0))


def _trace_dirs(storage, name: str, depth: int):
    if storage.is_dir(MANIFEST_DIR):
        yield storage, name
        return
    if depth == 0:
        return
    for child in storage.listdir():
        if not child.startswith(".") and storage.is_dir(child):
            yield from _trace_dirs(storage.child(child), f"{name}/{child}".lstrip("/"), depth - 1)


def _open_part(storage, rel: str, table: str | None = None) -> pq.ParquetFile:
    where = storage.describe(rel)
    if not storage.exists(rel):
        raise TraceError(f"flopcount: {where} is listed in the manifest but missing: run `flopcount verify`")
    try:
        part = pq.ParquetFile(storage.source(rel))
    except (OSError, *pa_errors()) as e:
        raise TraceError(f"flopcount: {where} is not a readable Parquet file (truncated or corrupt: "
                         f"{str(e).splitlines()[0][:80]}); run `flopcount verify`") from None
    metadata = part.schema_arrow.metadata or {}
    version = metadata.get(SCHEMA_METADATA_KEY, b"").decode() or None
    major = schema_major(version)
    if major is None:
        raise TraceError(f"flopcount: {where} is not a flopcount trace part (no {SCHEMA_METADATA_KEY.decode()} "
                         "metadata)")
    if major != TRACE_SCHEMA_MAJOR:
        raise TraceError(f"flopcount: {where} has trace schema {version}; this flopcount reads {TRACE_SCHEMA}: "
                         "use a flopcount version that matches the trace")
    problem = _column_problem(part.schema_arrow, TABLES[table]) if table else None
    if problem:
        raise TraceError(f"flopcount: {where} is not a {table} part of {TRACE_SCHEMA}: {problem}; "
                         "flopcount did not write it (read it with the tool that did, or leave it out)")
    return part


def _column_problem(found: pa.Schema, expected: pa.Schema) -> str | None:
    """What is wrong with a part's columns: a required one missing, or one of another type. Columns
    added within the major version are nullable, so older parts without them still read."""
    for field in expected:
        if field.name not in found.names:
            if not field.nullable:
                return f"column {field.name!r} is missing"
            continue
        kind = found.field(field.name).type
        if kind != field.type:
            return f"column {field.name!r} is {kind}, not {field.type}"
    return None


def iter_batches(traces: TraceSet, table: str, columns: list[str], batch_size: int = 1 << 17):
    """Record batches of ``columns`` from every committed part of ``table``; absent columns read as
    nulls. A batch holds rows of one part; of ``steps`` with ``step``, every row of its steps
    (a step over int64 is several rows: ``step_rows.whole_steps``)."""
    schema = TABLES[table]
    parts = [(trace, rel) for trace in traces.traces for rel in trace.parts(table)]
    for trace, rel in progress(parts, desc=f"reading {table}"):  # a bar on a terminal, for many parts
        part = _open_part(trace.storage, rel, table)
        present = [c for c in columns if c in part.schema_arrow.names]
        try:
            batches = (_with_columns(batch, columns, schema)
                       for batch in part.iter_batches(batch_size=batch_size, columns=present))
            yield from whole_steps(batches) if table == "steps" and "step" in columns else batches
        except (OSError, *pa_errors()) as e:
            raise TraceError(f"flopcount: {trace.storage.describe(rel)} cannot be decoded (corrupt: "
                             f"{str(e).splitlines()[0][:80]}); run `flopcount verify`") from None


def _with_columns(batch: pa.RecordBatch, columns: list[str], schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.names == columns:
        return batch
    arrays = [batch.column(c) if c in batch.schema.names else pa.nulls(batch.num_rows, schema.field(c).type)
              for c in columns]
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def read_table(location, table: str = "steps", columns: list[str] | None = None) -> pa.Table:
    traces = open_traces(location)
    columns = columns or TABLES[table].names
    batches = list(iter_batches(traces, table, columns))
    schema = pa.schema([TABLES[table].field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def read_trace(location, table: str = "steps"):
    """A pandas DataFrame of a trace dir (or a project dir of several): one row per step per rank
    (several rows of one step for a step over 2**63 - 1 FLOP: docs/traces.md, "Integers").

    ``table="breakdown"`` gives the per-module / per-op long table instead (see trace/schema.py).
    """
    if table not in TABLES:
        raise BadInput(f"flopcount: table={table!r} is not one of {', '.join(TABLES)}")
    frame = read_table(location, table).to_pandas()
    order = ["run_id", "step", "rank"] if table == "steps" else ["run_id", "rank", "first_step"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)
