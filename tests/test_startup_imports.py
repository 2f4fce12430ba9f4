"""A running meter imports nothing heavy that the user's job did not: Triton (about 0.25 s, a
second with torch._dynamo) and pandas (through pyarrow, about 0.3 s) stay out of the process.
Each check runs in a fresh interpreter and reads ``sys.modules``, with the totals' closed form."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

BACKENDS = ["dispatch", "native"]


def run(code: str) -> dict:
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# An op outside aten without a formula (a C++ extension's op, defined here the old way so that
# torch itself imports nothing more): flopcount looks it up in torch's register_flop_formula
# registry, which must not import torch.utils.flop_counter (and with it Triton) to find it empty.
FOREIGN_OP = """
import json, sys, torch
lib = torch.library.Library("fcstartup", "DEF")
lib.define("double(Tensor x) -> Tensor")
lib.impl("double", lambda x: x * 2, "CompositeExplicitAutograd")
import flopcount
a, b = torch.randn(3, 5), torch.randn(5, 7)
with flopcount.meter(backend="native") as m:
    for _ in range(2):
        torch.ops.fcstartup.double(a @ b)
        m.step()
s = m.summary()
print(json.dumps({"flops": s["hardware_flops"], "uncounted": s["uncounted_ops"],
                  "loaded": [n for n in ("triton", "torch.utils.flop_counter") if n in sys.modules]}))
"""


def test_a_native_meter_meeting_an_op_without_formula_imports_no_triton():
    got = run(FOREIGN_OP)
    assert got["loaded"] == []
    assert got["flops"] == 2 * (2 * 3 * 5 * 7)  # two steps of one [3,5] x [5,7] product
    assert got["uncounted"] == {"fcstartup.double": 2}


# 70 steps: past the first fold of the live window (summary.LIVE_WINDOW_STEPS = 64), then a summary.
LIVE_WINDOW = """
import json, sys, torch, flopcount
out = sys.argv[2] if sys.argv[2] != "-" else None
a, b = torch.randn(3, 5), torch.randn(5, 7)
with flopcount.meter(out=out, backend=sys.argv[1]) as m:
    for _ in range(70):
        a @ b
        m.step(tokens=3)
    folded = "pandas" in sys.modules
s = m.summary()
print(json.dumps({"folded": folded, "summarized": "pandas" in sys.modules, "flops": s["hardware_flops"],
                  "training": s["training_flops"], "steps": s["steps"], "tokens": s["tokens"]}))
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_out", [False, True])
def test_a_live_meter_folds_its_window_and_summarizes_without_pandas(backend, with_out, tmp_path):
    out = str(tmp_path / "run") if with_out else "-"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", LIVE_WINDOW, backend, out],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    product = 2 * 3 * 5 * 7  # one [3,5] x [5,7] product per step
    assert got == {"folded": False, "summarized": False, "flops": 70 * product, "training": 70 * product,
                   "steps": 70, "tokens": 70 * 3}


def test_arrays_built_and_read_from_buffers_equal_pyarrows_own():
    """trace/arrays.py against pyarrow's converters: the same arrays (nulls, offsets of slices,
    multi-byte strings), the same numpy values (nulls as NaN), the same group-by sums."""
    import random

    import numpy as np
    import pyarrow as pa

    from flopcount.trace.arrays import arrow_array, arrow_scalar, group_by, to_numpy

    rng = random.Random(7)
    make = {pa.int64(): lambda: rng.randint(-2**63, 2**63 - 1), pa.int32(): lambda: rng.randint(-2**31, 2**31 - 1),
            pa.float64(): lambda: rng.random() * 1e6, pa.bool_(): lambda: rng.random() < 0.5,
            pa.string(): lambda: "".join(rng.choice("aé€x") for _ in range(rng.randint(0, 4)))}
    for kind, value in make.items():
        for _ in range(100):
            values = [None if rng.random() < 0.2 else value() for _ in range(rng.randint(0, 20))]
            built, own = arrow_array(values, kind), pa.array(values, type=kind)
            assert built.equals(own) and built.null_count == own.null_count, (kind, values)
            start = rng.randint(0, len(values))
            length = rng.randint(0, len(values) - start)
            for ours, theirs in ((built, own), (built.slice(start, length), own.slice(start, length))):
                if kind == pa.string() or (kind == pa.bool_() and theirs.null_count):
                    continue  # read back through pyarrow itself
                got, want = to_numpy(ours), theirs.to_numpy(zero_copy_only=False)
                assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), (kind, got, want)
        if values and values[0] is not None:
            assert arrow_scalar(values[0], kind).equals(pa.scalar(values[0], type=kind))
    keys = arrow_array(["a", "b", None, "a", "b", "a"], pa.string())
    table = pa.table({"key": keys, "value": arrow_array([1, 2, 3, 4, 5, 6], pa.int64())})
    ours = group_by(table, ["key"], [("value", "sum"), ("value", "max")])
    assert ours.equals(table.group_by(["key"], use_threads=False).aggregate([("value", "sum"), ("value", "max")]))
    assert ours.to_pylist() == [{"key": "a", "value_sum": 11, "value_max": 6},
                                {"key": "b", "value_sum": 7, "value_max": 5},
                                {"key": None, "value_sum": 3, "value_max": 3}]


# The CLI's analysis commands on a real trace, each in a fresh interpreter: pandas (through
# pyarrow's conversions) and torch stay out (trace/arrays.py builds and reads Arrow arrays itself).
ANALYSIS = """
import contextlib, io, json, sys
from flopcount import cli
with contextlib.redirect_stdout(io.StringIO()):
    code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": [n for n in ("pandas", "torch") if n in sys.modules]}))
"""
TRACE = """
import sys, torch, flopcount
a, b = torch.randn(3, 5), torch.randn(5, 7)
with flopcount.meter(out=sys.argv[1], backend="dispatch") as m:
    for _ in range(2):
        a @ b
        m.step()
"""


def test_the_clis_analysis_commands_import_neither_pandas_nor_torch(tmp_path):
    out = str(tmp_path / "run")
    made = subprocess.run([sys.executable, "-W", "ignore", "-c", TRACE, out], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    commands = [["summarize", out, "--json"], ["verify", out], ["check", out, "--base-model-flops", "1e24"],
                ["estimate", out, "--steps", "10"],
                ["report", out, "--format", "html", "-o", str(tmp_path / "report.html")]]
    for command in commands:
        result = subprocess.run([sys.executable, "-W", "ignore", "-c", ANALYSIS, *command], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {"code": 0, "loaded": []}, command


DISPATCH_FIRST_OP = """
import json, sys, torch, flopcount
a, b = torch.randn(3, 5), torch.randn(5, 7)
with flopcount.meter(backend="dispatch") as m:
    for _ in range(2):
        a @ b
        m.step()
print(json.dumps({"flops": m.summary()["hardware_flops"],
                  "loaded": [n for n in ("torch._dynamo", "triton") if n in sys.modules]}))
"""


def test_the_dispatch_backend_imports_no_dynamo_at_its_first_op():
    """torch wraps a TorchDispatchMode's __torch_dispatch__ in _disable_dynamo, which imports
    Dynamo (Inductor, Triton: about a second) at the first op; the dispatch backend keeps Dynamo
    off its frames without it (capture/dispatch.py)."""
    got = run(DISPATCH_FIRST_OP)
    assert got == {"flops": 2 * (2 * 3 * 5 * 7), "loaded": []}
