"""Which rows of a ``steps`` batch are one step: the one grouping every reader makes before it
forms a per-step figure (the per-step FLOP/s of the hardware cross-check, the report's series,
the Art. 52(1) crossing time).

A step of one rank is one ``steps`` row, or, for a step over 2**63 - 1 FLOP, several consecutive
rows of the same step number (docs/traces.md, "Integers"). The rows of one step are consecutive
and agree on (run_id, rank, segment, step, trailing): a trailing row (work after the last
optimizer step) carries the number of the step after it, and ``trailing`` keeps it apart from a
resumed segment's first step of that number, which its ``segment`` does too. A step's rows are
in one part (the writer's window takes a split step whole), and ``whole_steps`` keeps them in one
record batch when a part is read in several.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .arrays import arrow_scalar, to_numpy

STEP_KEY = ("run_id", "rank", "segment", "step", "trailing")  # equal on every row of one step
_FALSE = arrow_scalar(False, pa.bool_())  # a Python value would import pandas (trace/arrays.py)


def _key_column(batch: pa.RecordBatch, name: str):
    column = batch.column(name)
    return pc.fill_null(column, _FALSE) if name == "trailing" else column  # null: older traces, not trailing


def step_starts(batch: pa.RecordBatch) -> np.ndarray:
    """The index of each step's first row in a ``steps`` batch (with ``step``; the other columns
    of STEP_KEY where the batch has them), in row order: a new step starts wherever a key column
    changes. Steps of one row each (every step within int64) cost one comparison of ``step``."""
    n = batch.num_rows
    steps = to_numpy(batch.column("step"))
    same = steps[1:] == steps[:-1]
    if not same.any():
        return np.arange(n)
    for name in STEP_KEY:
        if name != "step" and name in batch.schema.names:
            column = _key_column(batch, name)
            same &= to_numpy(pc.fill_null(pc.equal(column.slice(1), column.slice(0, n - 1)), _FALSE))
    return np.flatnonzero(np.concatenate(([True], ~same)))


def step_ends(starts: np.ndarray, rows: int) -> np.ndarray:
    """The index of each step's last row, from ``step_starts`` of a batch of ``rows`` rows."""
    return np.append(starts[1:], rows) - 1


def _same_step(last: pa.RecordBatch, first: pa.RecordBatch) -> bool:
    """Whether the first row of ``first`` continues the step of the last row of ``last``."""
    return all(_key_column(last, name)[-1].as_py() == _key_column(first, name)[0].as_py()
               for name in STEP_KEY if name in last.schema.names)


def whole_steps(batches):
    """The record batches of one ``steps`` part (with ``step``) again, each holding every row of
    its steps: rows of a step that a batch boundary splits move into the next batch."""
    held = None
    for batch in batches:
        if held is None or not held.num_rows:
            held = batch
        elif not batch.num_rows:
            continue
        elif _same_step(held, batch):
            start = int(step_starts(held)[-1])
            if start:
                yield held.slice(0, start)
            held = pa.Table.from_batches([held.slice(start), batch]).combine_chunks().to_batches()[0]
        else:
            yield held
            held = batch
    if held is not None:
        yield held
