"""The step range a steps part's Parquet footer records, read straight from the file's bytes.

``verify`` checks every part's claimed rows and step range against its steps file. The footer's
column statistics hold them (min and max of ``step``, exact: int64 statistics are never
truncated), but pyarrow takes about 0.1 ms to decode a footer (0.12 ms with the Arrow schema
that flopcount's parts carry), which more than doubles verify's time on traces of many small
parts. The statistics of the ``step`` column chunk are a few bytes of the footer, in Thrift's
compact protocol (https://github.com/apache/parquet-format, parquet.thrift; the compact
protocol's spec in Apache Thrift): this module finds each ``step`` column chunk by its
``path_in_schema`` and reads on to its ``num_values`` and ``statistics``, in about 0.01 ms.

It is a fast confirmation only: ``integrity.StepsFiles`` takes its answer when it agrees with the
part's claims, and asks pyarrow (``integrity.steps_file``) whenever it does not or finds nothing.
"""
from __future__ import annotations

import re
import struct
from typing import NamedTuple

MAGIC = b"PAR1"  # an encrypted footer ("PARE") is left to pyarrow
# ColumnMetaData.path_in_schema == ["step"]: field 3 (after field 2, encodings) of type list
# (0x19), a list of one binary (0x18), 4 bytes long, "step". The schema element named "step"
# has its name as a plain binary field (no list header), so it never matches.
_STEP_CHUNK = re.compile(rb"\x19\x18\x04step")
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)
_NUM_VALUES, _STATISTICS = 5, 12  # ColumnMetaData fields
_MAX, _MIN, _MAX_VALUE, _MIN_VALUE, _MAX_EXACT, _MIN_EXACT = 1, 2, 5, 6, 7, 8  # Statistics fields


class FooterSteps(NamedTuple):
    rows: int   # the step column's values over all row groups: the rows (it has no nulls)
    first: int  # its smallest and largest value
    last: int


def footer_steps(data: bytes) -> FooterSteps | None:
    """Rows and step range of a steps part's bytes from its footer's ``step`` column chunks;
    None when they cannot be read this way (no statistics, an unexpected layout)."""
    try:
        if len(data) < 12 or data[-4:] != MAGIC:
            return None
        length = struct.unpack_from("<i", data, len(data) - 8)[0]
        footer = data[len(data) - 8 - length:len(data) - 8]
        chunks = [_chunk(footer, match.end()) for match in _STEP_CHUNK.finditer(footer)]
    except (IndexError, ValueError, struct.error):
        return None
    if not chunks or None in chunks:
        return None
    return FooterSteps(sum(c[0] for c in chunks), min(c[1] for c in chunks), max(c[2] for c in chunks))


def _chunk(footer: bytes, at: int) -> tuple[int, int, int] | None:
    """(num_values, min, max) of the ColumnMetaData read on from its path_in_schema (field 3)."""
    field, rows = 3, None
    while True:
        field, kind, at = _field(footer, at, field)
        if kind == _STOP:
            return None  # no statistics
        if field == _NUM_VALUES and kind == _I64:
            value, at = _varint(footer, at)
            rows = _zigzag(value)
        elif field == _STATISTICS and kind == _STRUCT:
            low, high = _statistics(footer, at)
            return None if rows is None or low is None or high is None else (rows, low, high)
        else:
            at = _skip(footer, at, kind)


def _statistics(footer: bytes, at: int) -> tuple[int | None, int | None]:
    """(min, max) of an int64 column's Statistics: min_value / max_value, else the older min /
    max (signed order, the same for int64); None where absent or marked inexact."""
    values, exact, field = {}, True, 0
    while True:
        field, kind, at = _field(footer, at, field)
        if kind == _STOP:
            break
        if kind == _BINARY and field in (_MAX, _MIN, _MAX_VALUE, _MIN_VALUE):
            size, at = _varint(footer, at)
            values[field], at = footer[at:at + size], at + size
        elif kind in (_TRUE, _FALSE) and field in (_MAX_EXACT, _MIN_EXACT):
            exact = exact and kind == _TRUE
        else:
            at = _skip(footer, at, kind)
    low, high = values.get(_MIN_VALUE, values.get(_MIN)), values.get(_MAX_VALUE, values.get(_MAX))
    if not exact or low is None or high is None or len(low) != 8 or len(high) != 8:
        return None, None
    return int.from_bytes(low, "little", signed=True), int.from_bytes(high, "little", signed=True)


def _field(data: bytes, at: int, last: int) -> tuple[int, int, int]:
    """(field id, type, position after the header) of the field header at ``at``; type 0: the struct's end."""
    header = data[at]
    at += 1
    if header == _STOP:
        return last, _STOP, at
    delta, kind = header >> 4, header & 0x0F
    if delta:
        return last + delta, kind, at
    value, at = _varint(data, at)
    return _zigzag(value), kind, at


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _zigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _skip(data: bytes, at: int, kind: int) -> int:
    """The position after a value of type ``kind`` at ``at``."""
    if kind in (_TRUE, _FALSE):
        return at  # a bool field's value is in its header
    if kind == _BYTE:
        return at + 1
    if kind in (_I16, _I32, _I64):
        return _varint(data, at)[1]
    if kind == _DOUBLE:
        return at + 8
    if kind == _BINARY:
        size, at = _varint(data, at)
        return at + size
    if kind in (_LIST, _SET):
        header = data[at]
        at += 1
        size, element = header >> 4, header & 0x0F
        if size == 15:
            size, at = _varint(data, at)
        if element in (_TRUE, _FALSE):
            return at + size  # bools in a list: one byte each
        for _ in range(size):
            at = _skip(data, at, element)
        return at
    if kind == _MAP:
        size, at = _varint(data, at)
        if not size:
            return at
        types = data[at]
        at += 1
        for _ in range(size):
            at = _skip(data, _skip(data, at, types >> 4), types & 0x0F)
        return at
    if kind == _STRUCT:
        field = 0
        while True:
            field, inner, at = _field(data, at, field)
            if inner == _STOP:
                return at
            at = _skip(data, at, inner)
    raise ValueError(f"unknown Thrift compact type {kind}")
