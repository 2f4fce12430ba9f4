"""A library counted at its Python API launches Triton kernels (Unsloth, Liger, fla, mamba-ssm):
the launches are the API call's work, neither booked again nor reported uncounted; the same
kernel launched outside the API is uncounted. Under Triton's interpreter, in a child process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flopcount.formulas.constants import PER_ELEMENT

pytest.importorskip("triton")


def test_kernels_inside_an_api_call_are_its_work():
    script = Path(__file__).with_name("triton_api_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["close"]
    api = result["api"]
    assert api["uncounted_ops"] == {}
    assert api["by_op"]["unsloth.kernels.swiglu.swiglu_fg_kernel"] == {
        "flops": 35 * (PER_ELEMENT["silu"].flops + 1), "calls": 1}
    assert result["bare"]["uncounted_ops"] == {"unsloth.kernels.swiglu._fg_kernel": 1}
