"""The README's Accelerate use: flopcount.meter inside an Accelerate script, 2 processes on CPU.

Per process: 3 optimizer steps of 2 micro-batches of 8 (gradient accumulation), Linear 16 -> 32 -> 4.
Matmul FLOPs per micro-batch: forward 2*8*(16*32 + 32*4); backward the weight gradients (the same
again) plus the second Linear's input gradient 2*8*32*4.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flopcount
from flopcount.trace.reader import read_table

pytest.importorskip("accelerate")

SCRIPTS = Path(__file__).parent / "integration_scripts"
BIN = Path(sys.executable).parent
STEPS, ACCUM, BATCH = 3, 2, 8
FORWARD = 2 * BATCH * (16 * 32 + 32 * 4)
BACKWARD = FORWARD + 2 * BATCH * 32 * 4


def test_meter_inside_an_accelerate_script_two_processes(tmp_path):
    accelerate = [str(BIN / "accelerate")] if (BIN / "accelerate").exists() else [
        sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    env = {**os.environ, "STEPS": str(STEPS), "ACCUM": str(ACCUM), "FLOPCOUNT_OUT": str(tmp_path / "run"),
           "OMP_NUM_THREADS": "1"}
    env.pop("FLOPCOUNT_RUN", None)
    # --multi_gpu picks accelerate's torchrun-style launcher; without CUDA it runs gloo on CPU.
    result = subprocess.run([*accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "train_accelerate.py"],
                            env=env, cwd=SCRIPTS, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = flopcount.summarize(str(tmp_path / "run"))
    cats = summary["by_phase_category"]
    assert sorted(summary["ranks"]) == [0, 1] and summary["world_size"] == 2
    assert cats["forward"]["matmul"] == 2 * STEPS * ACCUM * FORWARD
    assert cats["backward"]["matmul"] == 2 * STEPS * ACCUM * BACKWARD
    assert summary["steps"] == STEPS
    steps = read_table(str(tmp_path / "run"), "steps").to_pandas()
    steps = steps[~steps["trailing"].astype(bool)]  # the barrier after the loop is trailing work
    assert sorted(steps.groupby("rank").size().tolist()) == [STEPS, STEPS]  # one step per optimizer step
    assert steps["samples"].tolist() == [ACCUM * BATCH] * (2 * STEPS)
