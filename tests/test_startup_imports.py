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
