"""flopcount/exact.py: the one exact-integer sum scheme (32-bit limbs in int64, totals in Python ints)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flopcount.exact import (LIMB_AGGREGATES, exact_sum, from_limbs, grouped_sums, running_sums, to_limbs,
                             with_limbs)

INT64_MAX = 2**63 - 1


def test_exact_sum_beyond_int64_and_float_precision():
    values = [INT64_MAX, INT64_MAX, INT64_MAX, 1, 2**53 + 1]
    expected = 3 * (2**63 - 1) + 1 + 2**53 + 1
    assert exact_sum(np.array(values, dtype=np.int64)) == expected > 2**64
    assert exact_sum(pa.array(values + [None], type=pa.int64())) == expected  # nulls count 0
    assert float(sum(float(v) for v in values)) != expected  # what float64 would have said
    assert int(np.array(values, dtype=np.int64).sum()) != expected  # what an int64 sum wraps to
    assert exact_sum(pa.chunked_array([[INT64_MAX], [INT64_MAX]], type=pa.int64())) == 2 * INT64_MAX
    assert exact_sum(np.array([], dtype=np.int64)) == 0


def test_grouped_sums_beyond_int64():
    table = pa.table({"key": ["a", "b", "a", "a", "b"],
                      "value": pa.array([INT64_MAX, 5, INT64_MAX, 3, 7], type=pa.int64())})
    grouped = with_limbs(table).group_by(["key"], use_threads=False).aggregate(LIMB_AGGREGATES)
    sums = dict(zip(grouped.column("key").to_pylist(), grouped_sums(grouped)))
    assert sums == {"a": 2 * INT64_MAX + 3, "b": 12}


def test_limbs_round_trip_and_running_sums():
    values = [0, 1, 2**64 + 12345, 2**127 + 2**63 + 9]
    limbs = to_limbs(values)
    assert len(limbs) == 4 * len(values) and all(0 <= limb < 2**32 for limb in limbs)
    assert from_limbs(limbs) == values
    with pytest.raises(ValueError):
        to_limbs([2**128])
    assert list(running_sums([INT64_MAX, INT64_MAX, 2])) == [INT64_MAX, 2 * INT64_MAX, 2 * INT64_MAX + 2]
