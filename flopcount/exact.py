"""Exact integer sums: the one scheme for adding FLOP counts, calls and bytes.

Trace columns are int64, and a sum of many int64 values leaves int64 (a few hours of one GPU's
FLOPs), while float64 is not exact above 2**53. Every total is therefore a Python int, and where
numbers are added in bulk (numpy, pyarrow, an all-reduce) they travel as base-2**32 *limbs* in
int64: each limb is below 2**32, so up to 2**31 limbs add up without leaving int64, and the
limb sums recombine exactly into a Python int. One non-negative int64 is two limbs; a total sent
to other ranks is ``COLLECTIVE_LIMBS`` limbs (exact below 2**128). Running totals (the crossing
of a threshold, the report's cumulative series) are Python ints too: ``running_sums``.

numpy and pyarrow are imported where the arrays are: the planner and the Code of Practice form
use the running sums without loading them.
"""
from __future__ import annotations

from itertools import accumulate

from .errors import BadInput

LIMB_BITS = 32
LIMB_MASK = (1 << LIMB_BITS) - 1
COLLECTIVE_LIMBS = 4  # limbs per total in an all-reduce: exact for any value below 2**128


def to_limbs(values: list[int], limbs: int = COLLECTIVE_LIMBS) -> list[int]:
    """``values`` (non-negative ints below 2**(32*limbs)) as ``limbs`` limbs each, lowest first."""
    out = []
    for value in values:
        if not 0 <= value < 1 << (LIMB_BITS * limbs):
            raise BadInput(f"flopcount: total {value} is outside [0, 2**{LIMB_BITS * limbs})")
        out.extend((value >> (LIMB_BITS * i)) & LIMB_MASK for i in range(limbs))
    return out


def from_limbs(limbs: list[int], per_value: int = COLLECTIVE_LIMBS) -> list[int]:
    """The values whose limbs (lowest first, ``per_value`` each) were summed into ``limbs``."""
    return [sum(int(limb) << (LIMB_BITS * i) for i, limb in enumerate(limbs[j:j + per_value]))
            for j in range(0, len(limbs), per_value)]


def exact_sum(values) -> int:
    """Exact sum of non-negative int64 values (a numpy or pyarrow array; nulls count 0), as a Python int."""
    import numpy as np

    if hasattr(values, "fill_null"):  # a pyarrow array
        from .trace.arrays import arrow_scalar, to_numpy  # pyarrow's own would import pandas (trace/arrays.py)

        values = to_numpy(values.fill_null(arrow_scalar(0, values.type)))
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return 0
    lo, hi = int((values & LIMB_MASK).sum(dtype=np.int64)), int((values >> LIMB_BITS).sum(dtype=np.int64))
    return from_limbs([lo, hi], per_value=2)[0]


def exact_sums_at(values, starts) -> list[int]:
    """Exact sums (Python ints) of the runs of non-negative int64 ``values`` (a pyarrow array
    without nulls) that begin at the indices ``starts`` (increasing, the first 0): a step's rows
    (trace/step_rows.py), whose sum can leave int64."""
    import numpy as np

    from .trace.arrays import to_numpy

    values = np.asarray(to_numpy(values), dtype=np.int64)
    if values.size == 0:
        return []
    lo = np.add.reduceat(values & LIMB_MASK, starts).tolist()
    hi = np.add.reduceat(values >> LIMB_BITS, starts).tolist()
    return [(h << LIMB_BITS) + low for low, h in zip(lo, hi)]


def with_limbs(table: pa.Table, column: str = "value") -> pa.Table:
    """``table`` plus the two limbs of its int64 ``column`` as ``lo`` and ``hi``, for a group-by
    that sums them (``("lo", "sum"), ("hi", "sum")``) and ``grouped_sums`` that joins them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .trace.arrays import arrow_scalar  # pa.scalar would import pandas (trace/arrays.py)

    value = table.column(column)
    return table.append_column("lo", pc.bit_wise_and(value, arrow_scalar(LIMB_MASK, pa.int64()))).append_column(
        "hi", pc.shift_right(value, arrow_scalar(LIMB_BITS, pa.int64())))


LIMB_AGGREGATES = [("lo", "sum"), ("hi", "sum")]


def grouped_sums(grouped: pa.Table) -> list[int]:
    """The exact sums of a group-by over ``with_limbs`` columns (``LIMB_AGGREGATES``), one per group."""
    return [(hi << LIMB_BITS) + lo for lo, hi in zip(grouped.column("lo_sum").to_pylist(),
                                                     grouped.column("hi_sum").to_pylist())]


def running_sums(values):
    """The cumulative exact sums (Python ints) of ``values``, in order (an iterator)."""
    return accumulate(int(v) for v in values)
