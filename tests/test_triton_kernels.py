"""Triton kernels launched directly, counted per launch through their pre-run hooks.

Runs on CPU under Triton's interpreter, in a child process (tests/triton_interpreted.py):
TRITON_INTERPRET=1 has to be set before Triton is first imported.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROWS, COLS, N = 6, 40, 37


@pytest.fixture(scope="module")
def result() -> dict:
    script = Path(__file__).with_name("triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), str(ROWS), str(COLS), str(N)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_run_under_the_interpreter(result):
    assert result["kernel_types"] == ["InterpretedFunction"]
    assert result["rms_norm_close"] and result["square_close"] and result["double_close"]


def test_kernel_with_formula_is_counted_per_launch(result):
    summary, name = result["rms_norm"], result["names"]["rms_norm"]
    flops = 3 * 4 * ROWS * COLS  # 3 launches; the launch outside the meter is not booked
    assert summary["by_op"][name] == {"flops": flops, "calls": 3}
    assert summary["by_phase_category"]["forward"]["norm"] == summary["hardware_flops"] == flops
    assert summary["uncounted_ops"] == {}


def test_fused_cross_entropy_kernel(result):
    """The worked example of docs/custom_kernels.md: 4 per logit and 3 per row."""
    assert result["cross_entropy_close"]
    assert result["cross_entropy"]["by_op"][result["names"]["cross_entropy"]] == \
        {"flops": 4 * ROWS * COLS + 3 * ROWS, "calls": 1}


def test_kernel_behind_heuristics_uses_the_kernels_formula(result):
    assert result["square"]["by_op"][result["names"]["square"]] == {"flops": N, "calls": 1}


def test_kernel_without_formula_is_uncounted_warned_once_and_strict_fails(result):
    name = result["names"]["double"]
    assert result["double"]["uncounted_ops"] == {name: 2}
    assert result["double"]["hardware_flops"] == 0
    assert result["double_warnings"] == 1
    assert "double_kernel" in result["strict_error"] and "register_formula" in result["strict_error"]
