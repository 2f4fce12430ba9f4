"""Audit reports (JSON, Markdown, HTML) and the terminal compliance summary."""
from __future__ import annotations

import base64
import json
import re

import pytest

from flopcount.report import RENDERERS, build_report
from flopcount.report import compliance_text
from flopcount.report.text import compliance_summary
from tracegen import MATMUL_PER_STEP, train, tree_digest

REPORT_KEYS = {"schema", "generated_at", "tool", "project", "totals", "compliance", "breakdowns", "method",
               "integrity", "series"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "ft-1"
    meter = train(root, steps=8, flush_every=3, eval_every=4, base_model="google/gemma-2-2b")
    return root, meter.summary()


def test_report_content(run_dir):
    root, live = run_dir
    before = tree_digest(root)
    report = build_report(root)
    assert set(report) == REPORT_KEYS
    assert report["totals"]["training_flops"] == live["training_flops"]
    assert report["totals"]["excluded_flops"] == 2 * MATMUL_PER_STEP // 2  # two eval forwards
    assert report["compliance"]["threshold_flops"] == pytest.approx(3.1e22 / 3)
    assert report["compliance"]["status"] == "below"
    [run] = report["project"]["runs"]
    assert (run["run_id"], run["ranks"], run["first_step"], run["last_step"]) == ("ft-1", [0], 0, 7)
    assert report["integrity"]["verified"] and re.fullmatch(r"fc1-[0-9a-f]{64}-\d+", run["manifest_digest"])
    assert report["method"]["phases_excluded"]["recompute"].endswith("excluded by Annex A.1")
    cumulative = [p[3] for p in report["series"]["cumulative_training_flops"]]
    assert len(cumulative) == 8 and cumulative == sorted(cumulative) and cumulative[-1] == live["training_flops"]
    assert tree_digest(root) == before


def test_markdown_and_html_embed_a_png_plot(run_dir):
    root, _ = run_dir
    report = build_report(root)
    for form in ("md", "html"):
        text = RENDERERS[form](report)
        match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
        assert match, form
        assert base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
        assert "1.0e22 FLOP" in text  # one third of Gemma 2 2B's 3.1e22, two significant figures
        assert "Annex A.1" in text and report["project"]["runs"][0]["manifest_digest"][:16] in text
    assert json.loads(RENDERERS["json"](report))["compliance"]["status"] == "below"


def test_report_lists_integrity_problems(tmp_path):
    train(tmp_path / "run", steps=2, flush_every=1)
    steps = tmp_path / "run" / "steps"
    (steps / "r00000-000007.parquet").write_bytes((steps / "r00000-000000.parquet").read_bytes())
    report = build_report(tmp_path / "run", base_model_flops=1e20)
    assert not report["integrity"]["verified"]
    assert report["integrity"]["problems"] == [
        "steps/r00000-000007.parquet: not listed in any manifest (unlisted part)"]
    assert "- **verified**: NO" in RENDERERS["md"](report)
    assert report["totals"]["steps"] == 2  # the unlisted part is not read


def test_compliance_text_for_the_demo(run_dir):
    root, live = run_dir
    text = compliance_summary(root)
    assert compliance_text(root).splitlines()[1:] == text.splitlines()[1:]
    assert "google/gemma-2-2b: 3.1e22 FLOP" in text
    assert "threshold            1.0e22 FLOP = one third of the base model's training compute" in text
    assert f"training compute     {live['compliance']['text']['training_flops']}" in text
    assert "status               below" in text and "parts checked: verified" in text


def test_recorded_base_model_not_in_the_registry(tmp_path):
    from flopcount.cli import main
    from flopcount.compliance import UnknownBaseModel

    train(tmp_path / "run", steps=2, base_model="gemma-2-2c")
    with pytest.raises(UnknownBaseModel, match="did you mean google/gemma-2-2b"):
        build_report(tmp_path / "run")
    assert main(["check", str(tmp_path / "run")]) == 2
    report = build_report(tmp_path / "run", use_recorded=False)
    assert report["compliance"]["threshold_basis"] == "unknown_base_compute"
