"""The versioned trace schema: the one place that defines what a trace directory holds.

A trace directory (``meter(out=DIR)``) holds one run, written by every rank of the job::

    DIR/
      manifest/r00000.jsonl        one chained, hashed log per writer (see manifest.py)
      lease/r00000.lease           the lease of the writer that is writing now (see lease.py)
      steps/r00000-000000.parquet  table ``steps``: one row per step per rank (a step past int64: several)
      breakdown/r00000-000000.parquet  table ``breakdown``: long-format FLOPs and calls per flush window

Each flush writes one ``steps`` part and one ``breakdown`` part per rank, with the same sequence
number, then appends one ``part`` entry to the rank's manifest. Reopening DIR resumes the run:
a new ``segment`` entry, sequence numbers and step numbers continue.

Version policy: ``TRACE_SCHEMA`` is ``flopcount.trace/<major>``. Readers accept their own major
version only; adding a column is a minor change that keeps the major version (readers unify
schemas and fill absent columns with nulls); removing or re-meaning one bumps the major version.

User phases (``Meter.phase(name)``) have no fixed column: their sum is ``phase_user`` in ``steps``
and each name appears as a value of ``breakdown.phase`` (with ``training`` saying whether it counts
toward ``training_flops``), so new phase names never change the schema.

Derived work: FLOPs that no capture path saw but that flopcount derives from counts (TRL's vLLM
rollouts, from the engine's prompt and completion token counts: integrations/vllm.py) are booked
like ops, under an op name that starts with ``DERIVED_OP_PREFIX`` (``derived.vllm.generate``), so
every table, summary and report can tell derived FLOPs from captured ones without a new column.

FLOP values are int64 (up to 9.2e18, about 26 hours of one 100 TFLOP/s GPU) and never leave
it: a step of one rank over INT64_MAX FLOPs is several ``steps`` rows of the same step number,
each adding up as one row does, slicing the step's time and energy, its counts in the first
(accounting.StepRows); a breakdown sum over it is several rows of the same key. A breakdown
window is flushed early before its sums could leave int64, so only such a step is split. Totals
across steps, ranks and runs are summed exactly in Python integers, never in int64 columns
(exact.py), so split rows add up like any others; a per-step figure takes a step's rows
together (trace/step_rows.py: consecutive rows of one run_id, rank, segment, step and trailing).

Documentation: every column is defined once, below, with its type and meaning (``Column``); the
column tables of docs/traces.md are this module's output (``python -m flopcount.trace.schema
--update docs/traces.md``; a test checks the copy). Rows are built by column name
(``record_batch``), never by position.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ..conventions import BUILTIN_PHASES, CATEGORIES, DERIVED_OP_PREFIX  # noqa: F401 (documented above)
from .arrays import arrow_array

TRACE_SCHEMA = "flopcount.trace/1"
TRACE_SCHEMA_MAJOR = 1
SCHEMA_METADATA_KEY = b"flopcount.schema"
TABLE_METADATA_KEY = b"flopcount.table"

INT64_MAX = 2**63 - 1

# Column name of each built-in phase and each category in ``steps``.
PHASE_COLUMNS = {phase: f"phase_{phase}" for phase in BUILTIN_PHASES}
USER_PHASE_COLUMN = "phase_user"
CATEGORY_COLUMNS = {category: f"cat_{category}" for category in CATEGORIES}


@dataclass(frozen=True)
class Column:
    """One column of a trace table: its Arrow type, what it holds (``doc``, the text of
    docs/traces.md) and its ``group``, what kind of value it is, by which consumers select the
    columns they read (steps: run, step, counts, totals, phases, categories, ops, devices, energy;
    breakdown: run, window, key, value)."""

    name: str
    type: pa.DataType
    doc: str
    group: str
    nullable: bool = True

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)  # no field metadata: parts stay as written


def _int64(name: str, doc: str, group: str) -> Column:
    return Column(name, pa.int64(), doc, group, nullable=False)


# Table ``steps``: one row per closed step of one rank.
STEPS_COLUMNS = [
    Column("run_id", pa.string(), "the run (default: DIR's last path component)", "run", nullable=False),
    Column("rank", pa.int32(), "this rank", "run", nullable=False),
    Column("world_size", pa.int32(), "ranks in the job", "run", nullable=False),
    Column("segment", pa.int32(), "0 for the first opening of DIR, +1 per resume", "run", nullable=False),
    _int64("step", "the rank's step number: optimizer steps from 0, continuing across segments; a trailing "
           "row carries the number of the step after it", "step"),
    Column("start_time", pa.float64(), "Unix seconds", "step", nullable=False),
    Column("end_time", pa.float64(), "Unix seconds", "step", nullable=False),
    Column("tokens", pa.int64(), "as given to `Meter.step()`; null when not given", "counts"),
    Column("samples", pa.int64(), "as given to `Meter.step()`; null when not given", "counts"),
    _int64("training_flops", "forward + backward + optimizer + user phases marked training", "totals"),
    _int64("hardware_flops", "everything executed", "totals"),
    *[_int64(column, "FLOPs per built-in phase", "phases") for column in PHASE_COLUMNS.values()],
    _int64(USER_PHASE_COLUMN, "FLOPs of all user phases (`Meter.phase(name)`); per name in `breakdown`", "phases"),
    *[_int64(column, "FLOPs per category", "categories") for column in CATEGORY_COLUMNS.values()],
    _int64("uncounted_calls", "calls of ops without a formula", "ops"),
    _int64("collective_calls", "calls of communication ops (0 FLOP)", "ops"),
    _int64("collective_bytes", "bytes the communication ops moved", "ops"),
    # Devices and energy (docs/energy.md; added within version 1: null in older traces).
    Column("device_name", pa.string(), "the rank's device type: its GPUs' name, else its CPU model", "devices"),
    Column("device_count", pa.int32(), "how many (GPUs of the rank; 1 for a CPU rank)", "devices"),
    Column("gpu_energy_j", pa.float64(), "GPU energy of the step in J; null: no figure", "energy"),
    Column("gpu_energy_source", pa.string(),
           "`nvml_energy_counter`, `nvml_power_x_time`, `unavailable` or `none`", "energy"),
    Column("gpu_energy_devices", pa.int32(), "GPUs whose energy is in `gpu_energy_j`", "energy"),
    Column("cpu_energy_j", pa.float64(), "CPU package (+ DRAM) energy (RAPL) of the step in J; null: no figure",
           "energy"),
    Column("cpu_energy_source", pa.string(), "`rapl`, `rapl_local_rank_0` or `unavailable`", "energy"),
    # Work after the last optimizer step (final evaluation, trailing zero_grad, a save): counted
    # in its phases and totals, not a training step (``steps`` leaves it out).
    Column("trailing", pa.bool_(), "true for the row of work after the last optimizer step (see below); "
           "null in older traces (= false)", "step"),
]

# Table ``breakdown``: long format, one row per key per flush window [first_step, last_step] of a
# rank; ``kind`` says which keys are set and what ``value`` counts (BREAKDOWN_KINDS).
BREAKDOWN_KINDS = {
    "flops": ("phase, category, module, op, training", "FLOPs"),
    "calls": ("phase, op", "calls"),
    "uncounted": ("op", "calls of an op without a formula"),
    "collective_calls": ("op", "calls of a communication op"),
    "collective_bytes": ("op", "bytes a communication op moved"),
    # capture/dark.py; added within version 1
    "dark_module": ("module, op = the module's class",
                    "steps in which its forward ran but booked no FLOPs (work no capture path saw)"),
}
BREAKDOWN_COLUMNS = [
    Column("run_id", pa.string(), "the run", "run", nullable=False),
    Column("rank", pa.int32(), "this rank", "run", nullable=False),
    Column("segment", pa.int32(), "0 for the first opening of DIR, +1 per resume", "run", nullable=False),
    _int64("first_step", "the flush window's first step", "window"),
    _int64("last_step", "the flush window's last step", "window"),
    Column("kind", pa.string(), "what the row counts (table below)", "key", nullable=False),
    Column("phase", pa.string(), "phase (built-in or user)", "key"),
    Column("category", pa.string(), "category", "key"),
    Column("module", pa.string(), "fully qualified module name, `<root>` for ops directly in the outermost "
           "module's forward, `<none>` outside modules", "key"),
    Column("op", pa.string(), "op name (e.g. `aten.mm`); the module's class for `dark_module`", "key",
           nullable=False),
    Column("training", pa.bool_(), "whether the phase counts toward `training_flops`", "key"),
    _int64("value", "the count (table below)", "value"),
]
COLUMNS = {"steps": STEPS_COLUMNS, "breakdown": BREAKDOWN_COLUMNS}
STEPS_FIELDS = [c.field for c in STEPS_COLUMNS]
BREAKDOWN_FIELDS = [c.field for c in BREAKDOWN_COLUMNS]


def column_names(table: str, *groups: str) -> list[str]:
    """The names of ``table``'s columns in ``groups`` (all of them without groups), in schema order."""
    return [c.name for c in COLUMNS[table] if not groups or c.group in groups]


def _schema(fields, table: str) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: TRACE_SCHEMA.encode(),
                                       TABLE_METADATA_KEY: table.encode()})


STEPS_SCHEMA = _schema(STEPS_FIELDS, "steps")
BREAKDOWN_SCHEMA = _schema(BREAKDOWN_FIELDS, "breakdown")
TABLES = {"steps": STEPS_SCHEMA, "breakdown": BREAKDOWN_SCHEMA}



def record_batch(table: str, columns: dict, constants: dict, rows: int) -> pa.RecordBatch:
    """A record batch of ``table`` with ``rows`` rows, each column by name: its values from
    ``columns``, else one value for every row from ``constants``. A column in neither is a bug."""
    arrays = []
    for field in TABLES[table]:
        values = list(columns[field.name]) if field.name in columns else [constants[field.name]] * rows
        arrays.append(arrow_array(values, field.type))  # pa.array would import pandas
    return pa.RecordBatch.from_arrays(arrays, schema=TABLES[table])


MANIFEST_DIR = "manifest"


def writer_name(rank: int, process: int = 0) -> str:
    """The name of one writer of a trace dir: ``r00003`` for rank 3, ``r00003-p1`` for a second
    metered process of rank 3 (a child process under ``flopcount run``)."""
    return f"r{rank:05d}" if process == 0 else f"r{rank:05d}-p{process}"


def part_path(table: str, rank: int, seq: int, process: int = 0) -> str:
    """Relative path of a part file."""
    return f"{table}/{writer_name(rank, process)}-{seq:06d}.parquet"


def manifest_path(rank: int, process: int = 0) -> str:
    return f"{MANIFEST_DIR}/{writer_name(rank, process)}.jsonl"


LEASE_DIR = "lease"  # one lease file per writer while it writes (trace/lease.py); not trace content


def lease_path(rank: int, process: int = 0) -> str:
    return f"{LEASE_DIR}/{writer_name(rank, process)}.lease"


def schema_major(version: str | None) -> int | None:
    """The major version of a ``flopcount.trace/N`` string, or None when it is not one."""
    if not version or not version.startswith("flopcount.trace/"):
        return None
    major = version.split("/", 1)[1].split(".", 1)[0]
    return int(major) if major.isdigit() else None


# ---- documentation: docs/traces.md's column tables are this module's output ---------------------

def _type_text(column: Column) -> str:
    name = "float64" if column.type == pa.float64() else str(column.type)  # Arrow prints "double"
    return f"{name}{', nullable' if column.nullable else ''}"


def markdown_table(table: str) -> str:
    """The Markdown table of ``table``'s columns; neighbours with the same type and meaning share a row."""
    rows: list[tuple[list[str], str, str]] = []
    for column in COLUMNS[table]:
        if rows and rows[-1][1:] == (_type_text(column), column.doc):
            rows[-1][0].append(column.name)
        else:
            rows.append(([column.name], _type_text(column), column.doc))
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| {', '.join(f'`{n}`' for n in names)} | {kind} | {doc} |" for names, kind, doc in rows]
    if table == "breakdown":
        lines += ["", "| `kind` | keys set | `value` |", "|---|---|---|"]
        lines += [f"| `{kind}` | {keys} | {value} |" for kind, (keys, value) in BREAKDOWN_KINDS.items()]
    return "\n".join(lines)


def markers(table: str) -> tuple[str, str]:
    return f"<!-- schema:{table}:begin -->", f"<!-- schema:{table}:end -->"


def update_docs(path: str) -> None:
    """Rewrite the column tables between the schema markers in ``path`` (docs/traces.md)."""
    with open(path) as f:
        text = f.read()
    for table in COLUMNS:
        begin, end = markers(table)
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{markdown_table(table)}\n{end}{tail}"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_docs(sys.argv[2])
    else:
        print("\n\n".join(markdown_table(table) for table in COLUMNS))
