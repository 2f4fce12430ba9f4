"""Arrow arrays and scalars from Python values, and numpy arrays and group-bys from Arrow, without
importing pandas.

pyarrow's own converters (``pa.array``, ``pa.scalar``, and the compute functions given a Python
value, such as ``pc.fill_null(x, 0)``) first ask whether the value is a pandas object, and that
imports pandas (about 0.3 s, tens of MB) into a training process that never asked for it: a live
meter's first fold of its step window, 64 steps in. ``Array.to_numpy`` and ``Table.group_by``
import it too. The trace's column types (int64, int32, float64, bool, string; trace/schema.py)
are built here from their buffers and read back from them; the group-by runs the same Acero plan
as ``Table.group_by``. Other types go through pyarrow's own functions.
"""
from __future__ import annotations

import array as _array
from itertools import accumulate

import numpy as np
import pyarrow as pa

_NUMERIC = {pa.int64(): "q", pa.int32(): "i", pa.float64(): "d"}  # array module type codes


def _bits(flags: list) -> pa.Buffer:
    """An Arrow bitmap (least significant bit first) with bit i set where ``flags[i]`` is true."""
    return pa.py_buffer(np.packbits(np.asarray(flags, dtype=bool), bitorder="little"))


def arrow_array(values, type: pa.DataType) -> pa.Array:
    """``pa.array(values, type=type)`` for the trace's column types, without importing pandas
    (None is null). A value of the wrong kind raises (TypeError, OverflowError, AttributeError)."""
    values = list(values)
    n = len(values)
    valid = [v is not None for v in values]
    nulls = n - sum(valid)
    validity = _bits(valid) if nulls else None
    if type in _NUMERIC:
        code = _NUMERIC[type]
        zero = 0.0 if code == "d" else 0
        data = _array.array(code, [zero if v is None else v for v in values])
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(data)], null_count=nulls)
    if type == pa.bool_():
        return pa.Array.from_buffers(type, n, [validity, _bits([bool(v) for v in values])], null_count=nulls)
    if type == pa.string():
        encoded = [b"" if v is None else v.encode() for v in values]
        offsets = _array.array("i", accumulate((len(e) for e in encoded), initial=0))
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))],
                                     null_count=nulls)
    return pa.array(values, type=type)


def arrow_scalar(value, type: pa.DataType) -> pa.Scalar:
    """``pa.scalar(value, type=type)`` without importing pandas (see ``arrow_array``)."""
    return arrow_array([value], type)[0]


# ---- Arrow -> numpy, and group-by ----------------------------------------------------------------
# ``Array.to_numpy`` runs pyarrow's pandas converter, which imports pandas even for int64 without
# nulls; ``Table.group_by`` imports pyarrow.acero, which imports pyarrow.dataset, which imports pandas.
_FLOATS = {"halffloat": np.float16, "float": np.float32, "double": np.float64}  # str(pa type) -> dtype


def to_numpy(values) -> np.ndarray:
    """``values.to_numpy(zero_copy_only=False)`` for integer, floating-point and boolean arrays
    (or chunked arrays) without importing pandas: nulls as NaN (integers with nulls become
    float64, as pyarrow does). Booleans with nulls and other types go through pyarrow."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind, n, offset = values.type, len(values), values.offset
    if pa.types.is_boolean(kind) and not values.null_count:
        if n == 0:
            return np.zeros(0, dtype=bool)
        bits = np.unpackbits(np.frombuffer(values.buffers()[1], dtype=np.uint8), bitorder="little")
        return bits[offset:offset + n].astype(bool)
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return values.to_numpy(zero_copy_only=False)
    dtype = np.dtype(_FLOATS.get(str(kind), str(kind)))
    if n == 0:
        return np.zeros(0, dtype=np.float64 if values.null_count else dtype)
    data = np.frombuffer(values.buffers()[1], dtype=dtype, count=n, offset=offset * dtype.itemsize)
    if not values.null_count:
        return data
    valid = to_numpy(values.is_valid())
    out = data.astype(np.float64)
    out[~valid] = np.nan
    return out


def group_by(table: pa.Table, keys: list[str], aggregates: list[tuple[str, str]]) -> pa.Table:
    """``table.group_by(keys, use_threads=False).aggregate(aggregates)`` (``(column, function)``
    pairs, results named ``column_function``), as the same Acero plan, without importing pandas."""
    try:
        from pyarrow._acero import AggregateNodeOptions, Declaration, TableSourceNodeOptions
    except ImportError:  # a pyarrow built without Acero: table.group_by says so
        return table.group_by(keys, use_threads=False).aggregate(aggregates)
    plan = [([column], "hash_" + function, None, f"{column}_{function}") for column, function in aggregates]
    return Declaration.from_sequence([
        Declaration("table_source", TableSourceNodeOptions(table)),
        Declaration("aggregate", AggregateNodeOptions(plan, keys=keys)),
    ]).to_table(use_threads=False)
