"""Sequence-length histograms for `plan --lengths FILE`.

A histogram says how often a step's batch has each (padded or packed) length: each length L
is planned as one real step of batch_size x L tokens, and the plan's step is the
frequency-weighted mean of those steps (exact: sum of weight x FLOPs / sum of weights).

Formats (counts are whole numbers, lengths positive whole numbers):
  CSV  with a header line ``length,count``, one bucket a line;
  JSON ``{"512": 120, "1024": 40}`` or ``{"lengths": {"512": 120, ...}}``.
"""
from __future__ import annotations

import csv
import io
import json
import os

from ..errors import BadInput


def read_lengths(source) -> dict[int, int]:
    """{length: count} from a path or a mapping; one-line ValueError for anything else."""
    name = "lengths"
    if isinstance(source, dict):
        raw = source
    else:
        name = os.fspath(source)
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise BadInput(f"flopcount: cannot read lengths file {name}: {e.strerror}") from None
        raw = _parse(text, name)
    buckets = {}
    for length, count in raw.items():
        length, count = _whole(length, name, "length"), _whole(count, name, "count", zero_ok=True)
        if count:
            buckets[length] = buckets.get(length, 0) + count
    if not buckets:
        raise BadInput(f"flopcount: {name} has no length with a positive count")
    return buckets


def _parse(text: str, name: str) -> dict:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"flopcount: {name} is not JSON ({e.msg} at line {e.lineno})") from None
        data = data.get("lengths", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ValueError(f'flopcount: {name}: write {{"length": count, ...}}')
        return data
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0]] != ["length", "count"]:
        raise BadInput(f"flopcount: {name}: the first line must be the CSV header 'length,count'")
    out = {}
    for number, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise BadInput(f"flopcount: {name} line {number}: write 'length,count'")
        out[row[0].strip()] = out.get(row[0].strip(), 0) + _whole(row[1], f"{name} line {number}", "count",
                                                                    zero_ok=True)
    return out


def _whole(value, where: str, what: str, zero_ok: bool = False) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise BadInput(f"flopcount: {where}: {what} {value!r} is not a whole number") from None
    if number < (0 if zero_ok else 1):
        raise BadInput(f"flopcount: {where}: {what} {value!r} must be {'non-negative' if zero_ok else 'positive'}")
    return number
