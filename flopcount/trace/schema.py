"""The versioned trace schema: the one place that defines what a trace directory holds.

A trace directory (``meter(out=DIR)``) holds one run, written by every rank of the job::

    DIR/
      manifest/r00000.jsonl        one chained, hashed log per writer (see manifest.py)
      lease/r00000.lease           the lease of the writer that is writing now (see lease.py)
      steps/r00000-000000.parquet  table ``steps``: one row per step per rank
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

FLOP values are int64: one step of one rank fits (9.2e18 is about 26 hours of a 100 PFLOP/s
machine). A breakdown window is flushed early before its sums could leave int64. Totals across
steps, ranks and runs are summed exactly in Python integers, never in int64 columns.
"""
from __future__ import annotations

import pyarrow as pa

from ..conventions import BUILTIN_PHASES, CATEGORIES, DERIVED_OP_PREFIX  # noqa: F401 (documented above)

TRACE_SCHEMA = "flopcount.trace/1"
TRACE_SCHEMA_MAJOR = 1
SCHEMA_METADATA_KEY = b"flopcount.schema"
TABLE_METADATA_KEY = b"flopcount.table"

INT64_MAX = 2**63 - 1

# Column name of each built-in phase and each category in ``steps``.
PHASE_COLUMNS = {phase: f"phase_{phase}" for phase in BUILTIN_PHASES}
USER_PHASE_COLUMN = "phase_user"
CATEGORY_COLUMNS = {category: f"cat_{category}" for category in CATEGORIES}

# Table ``steps``: one row per closed step of one rank.
STEPS_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),      # the run (default: DIR's last path component)
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("world_size", pa.int32(), nullable=False),
    pa.field("segment", pa.int32(), nullable=False),      # 0 for the first opening of DIR, +1 per resume
    pa.field("step", pa.int64(), nullable=False),         # continues across segments
    pa.field("start_time", pa.float64(), nullable=False),  # Unix seconds
    pa.field("end_time", pa.float64(), nullable=False),
    pa.field("tokens", pa.int64()),                        # null when the program did not say
    pa.field("samples", pa.int64()),
    pa.field("training_flops", pa.int64(), nullable=False),
    pa.field("hardware_flops", pa.int64(), nullable=False),
    *[pa.field(column, pa.int64(), nullable=False) for column in PHASE_COLUMNS.values()],
    pa.field(USER_PHASE_COLUMN, pa.int64(), nullable=False),
    *[pa.field(column, pa.int64(), nullable=False) for column in CATEGORY_COLUMNS.values()],
    pa.field("uncounted_calls", pa.int64(), nullable=False),  # calls of ops without a formula
    pa.field("collective_calls", pa.int64(), nullable=False),  # communication ops (0 FLOP)
    pa.field("collective_bytes", pa.int64(), nullable=False),  # bytes they moved
    # Devices and energy (docs/energy.md; added within version 1: null in older traces).
    pa.field("device_name", pa.string()),          # the rank's device type: its GPUs' name, else its CPU model
    pa.field("device_count", pa.int32()),          # how many (GPUs of the rank; 1 for a CPU rank)
    pa.field("gpu_energy_j", pa.float64()),        # GPU energy of the step in J; null: no figure
    pa.field("gpu_energy_source", pa.string()),    # nvml_energy_counter / nvml_power_x_time / unavailable / none
    pa.field("gpu_energy_devices", pa.int32()),    # GPUs whose energy is in gpu_energy_j
    pa.field("cpu_energy_j", pa.float64()),        # CPU package (+ DRAM) energy (RAPL) in J; null: no figure
    pa.field("cpu_energy_source", pa.string()),    # rapl / rapl_local_rank_0 / unavailable
    # Work after the last optimizer step (final evaluation, trailing zero_grad, a save): counted
    # in its phases and totals, not a training step (``steps`` leaves it out). Added within
    # version 1: null (= false) in older traces.
    pa.field("trailing", pa.bool_()),
]

# Table ``breakdown``: long format, one row per key per flush window [first_step, last_step] of a rank.
#   kind="flops":     phase, category, module, op, training -> value = FLOPs
#   kind="calls":     phase, op                             -> value = calls
#   kind="uncounted": op                                    -> value = calls of an op without a formula
#   kind="collective_calls" / "collective_bytes": op         -> value = calls / bytes of a communication op
#   kind="dark_module": module, op = the module's class      -> value = steps in which it was dark: its
#                      forward ran but booked no FLOPs (capture/dark.py; added within version 1)
BREAKDOWN_KINDS = ("flops", "calls", "uncounted", "collective_calls", "collective_bytes", "dark_module")
BREAKDOWN_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("segment", pa.int32(), nullable=False),
    pa.field("first_step", pa.int64(), nullable=False),
    pa.field("last_step", pa.int64(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("phase", pa.string()),
    pa.field("category", pa.string()),
    pa.field("module", pa.string()),
    pa.field("op", pa.string(), nullable=False),
    pa.field("training", pa.bool_()),
    pa.field("value", pa.int64(), nullable=False),
]


def _schema(fields, table: str) -> pa.Schema:
    return pa.schema(fields, metadata={SCHEMA_METADATA_KEY: TRACE_SCHEMA.encode(),
                                       TABLE_METADATA_KEY: table.encode()})


STEPS_SCHEMA = _schema(STEPS_FIELDS, "steps")
BREAKDOWN_SCHEMA = _schema(BREAKDOWN_FIELDS, "breakdown")
TABLES = {"steps": STEPS_SCHEMA, "breakdown": BREAKDOWN_SCHEMA}

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
