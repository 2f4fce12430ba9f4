"""`flopcount run` with an unmodified TRL script (a real subprocess): the launcher's meter tags
TRL's work as the HF callback does. DPO's reference forwards are phase ``reference`` (training),
evaluate() is eval. The script imports datasets before torch (which asks importlib for torch's
spec first): metering still starts at torch's real import. Closed form per recorded call of B sequences of L positions (tiny Llama, see
test_trl_phases): matmul 2*B*(L*LW + P*HEAD), P = positions projected by the LM head."""
from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("trl")

import flopcount  # noqa: E402
from test_run import run_metered  # noqa: E402
from test_trl_phases import HEAD, LW  # noqa: E402


def matmul(calls, grad=None, in_eval=None) -> int:
    return sum(2 * b * (n * LW + (n - 1 if fused else n) * HEAD) for b, n, g, e, fused in calls
               if (grad is None or g == grad) and (in_eval is None or e == in_eval))


def test_run_meters_trl_dpo_reference_as_training_and_evaluate_as_eval(tmp_path):
    shapes = tmp_path / "shapes.json"
    result = run_metered(tmp_path / "run", [sys.executable, "train_trl_dpo.py"], timeout=400,
                         SHAPES_FILE=str(shapes), CKPT=str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr[-3000:]
    calls = json.loads(shapes.read_text())
    summary = flopcount.summarize(str(tmp_path / "run"))
    assert summary["steps"] == 2
    cats = summary["by_phase_category"]
    assert cats["reference"]["matmul"] == matmul(calls["reference"], in_eval=False) > 0
    assert cats["forward"]["matmul"] == matmul(calls["policy"], grad=True)
    assert cats["eval"]["matmul"] == matmul(calls["reference"], in_eval=True) + matmul(calls["policy"], grad=False)
    assert "reference" in summary["training_phases"] and "eval" not in summary["training_phases"]
    assert summary["uncounted_ops"] == {}  # DPO's log-sigmoid loss has its formula
