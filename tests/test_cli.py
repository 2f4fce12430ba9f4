"""The `flopcount` command line, run as a real subprocess (a few cases in-process through main())."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flopcount.cli import COMMANDS, main
from tracegen import BATCH, MATMUL_PER_STEP, TOKENS_PER_SAMPLE, cli, reseal, train, tree_digest


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two runs on Llama 3.2 1B: 4 + 6 steps. Returns (project dir, {run: live summary})."""
    root = tmp_path_factory.mktemp("cli") / "project"
    live = {run: train(root / run, steps=steps, flush_every=3, base_model="Llama-3.2-1B").summary()
            for run, steps in (("a", 4), ("b", 6))}
    return root, live


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_summarize_json_has_the_meter_summary_keys(project):
    root, live = project
    before = tree_digest(root)
    result = cli("summarize", root, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == set(live["a"]) | {"integrity"}  # the Meter.summary() keys and the integrity check
    assert summary["training_flops"] == live["a"]["training_flops"] + live["b"]["training_flops"]
    assert summary["training_by_category"]["matmul"] == 10 * MATMUL_PER_STEP
    assert summary["steps"] == 10 and summary["tokens"] == 10 * BATCH * TOKENS_PER_SAMPLE
    assert summary["run_id"] == ["a", "b"]
    assert tree_digest(root) == before  # reading never modifies a file


def test_check_below_exceeds_and_unknown_model(project):
    root, live = project
    total = live["a"]["training_flops"] + live["b"]["training_flops"]
    below = cli("check", root, "--json")
    assert below.returncode == 0, below.stderr
    result = json.loads(below.stdout)
    assert result["threshold_basis"] == "base_model_compute" and result["status"] == "below"
    assert result["threshold_flops"] == pytest.approx(6.6e22 / 3)
    assert result["training_flops"] == total and result["ratio"] == pytest.approx(total / (6.6e22 / 3))
    # A base model whose compute is 3x our total puts us exactly at the threshold: exit 1.
    at = cli("check", root, "--base-model-flops", str(3 * total))
    assert at.returncode == 1, at.stderr
    assert at.stdout.startswith("exceeds: training compute")
    unknown = cli("check", root, "--base-model", "llama-3.2-2b")
    assert unknown.returncode == 2
    line = one_line(unknown.stderr)
    assert "'llama-3.2-2b' is not in the registry" in line and "meta-llama/Llama-3.2-1B" in line


def test_non_numeric_flag_is_exit_2_with_one_line(project):
    root, _ = project
    result = cli("check", root, "--base-model-flops", "lots")
    assert result.returncode == 2
    assert "'lots' is not a number" in one_line(result.stderr)


@pytest.mark.parametrize("args, message", [
    (["check", "{root}/missing"], "does not exist"),
    (["summarize", "{empty}"], "is empty"),
    (["check", "{root}", "--base-model-flops", "-5"], "must be a positive"),
    (["estimate", "{root}", "--steps", "ten"], "'ten' is not a whole number"),
    (["check", "{root}", "--approaching", "1.5"], "must be in (0, 1]"),
])
def test_bad_input_in_process(project, tmp_path, capsys, args, message):
    root, _ = project
    (tmp_path / "empty").mkdir()
    argv = [a.format(root=root, empty=tmp_path / "empty") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    assert message in one_line(capsys.readouterr().err)


def test_corrupt_and_wrong_version_parts(tmp_path, capsys):
    """A part that cannot be read: exit 2 naming it when the manifest vouches for it (a writer's
    bug, a newer flopcount); exit 1 when it is not the part the manifest lists (verify's finding)."""
    train(tmp_path / "torn", steps=2, flush_every=1)
    part = tmp_path / "torn" / "steps" / "r00000-000001.parquet"
    part.write_bytes(part.read_bytes()[:-40])
    assert main(["summarize", str(tmp_path / "torn")]) == 1
    err = capsys.readouterr().err
    assert "r00000-000001.parquet: SHA-256 does not match" in err and "Traceback" not in err
    assert "r00000-000001.parquet is not a readable Parquet file" in err.splitlines()[-1]
    reseal(tmp_path / "torn")
    assert main(["summarize", str(tmp_path / "torn")]) == 2
    assert "r00000-000001.parquet is not a readable Parquet file" in one_line(capsys.readouterr().err)
    train(tmp_path / "future", steps=1)
    part = tmp_path / "future" / "steps" / "r00000-000000.parquet"
    pq.write_table(pq.read_table(part).replace_schema_metadata({b"flopcount.schema": b"flopcount.trace/2"}), part)
    reseal(tmp_path / "future")
    assert main(["check", str(tmp_path / "future")]) == 2
    assert "trace schema flopcount.trace/2" in one_line(capsys.readouterr().err)


def test_verify_exit_codes(tmp_path):
    train(tmp_path / "run", steps=4, flush_every=2)
    ok = cli("verify", tmp_path / "run")
    assert ok.returncode == 0, ok.stderr
    assert "4 parts checked, verified" in ok.stdout
    (tmp_path / "run" / "steps" / "r00000-000001.parquet").unlink()
    broken = cli("verify", tmp_path / "run", "--json")
    assert broken.returncode == 1
    check = json.loads(broken.stdout)
    assert check["verified"] is False and check["problems"] == ["steps/r00000-000001.parquet: missing (listed in manifest/r00000.jsonl)"]
    assert main(["verify", str(tmp_path / "nothing-here")]) == 2


def test_estimate_projects_the_plan(project):
    root, live = project
    total = live["a"]["training_flops"] + live["b"]["training_flops"]
    assert total % 10 == 0  # every step does the same work
    per_step = total // 10
    result = cli("estimate", root, "--steps", 1000, "--json")
    assert result.returncode == 0, result.stderr
    projection = json.loads(result.stdout)
    assert projection["projected_training_flops"] == pytest.approx(per_step * 1000)
    assert projection["crossing_step"] == -(-(66 * 10**21) // (3 * per_step))  # ceil(threshold / per step)
    crossing = cli("estimate", root, "--steps", 1000, "--base-model-flops", 3 * per_step * 500)
    assert crossing.returncode == 1
    assert "crossed at step 500" in crossing.stdout


def test_report_html_and_json(project, tmp_path):
    root, _ = project
    html = cli("report", root, "--format", "html", "-o", tmp_path / "report.html")
    assert html.returncode == 0, html.stderr
    page = (tmp_path / "report.html").read_text()
    assert '<img alt="cumulative training FLOP' in page and "data:image/png;base64," in page
    assert "2.2e22 FLOP" in page and "meta-llama/Llama-3.2-1B" in page and "manifest digest" in page
    assert main(["report", str(root), "--format", "json", "-o", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == "flopcount.report/1"
    assert report["integrity"]["verified"] and report["integrity"]["parts_checked"] == 2 * (2 + 2)
    assert report["series"]["cumulative_training_flops"][-1][3] == report["totals"]["training_flops"]


def test_models_lists_the_registry():
    result = cli("models", "--json")
    assert result.returncode == 0
    models = {m["hf_id"]: m for m in json.loads(result.stdout)}
    assert models["meta-llama/Llama-3.1-405B"]["systemic_risk"] is True
    assert models["mistralai/Mistral-7B-v0.1"]["training_flop"] is None


def test_every_subcommand_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: flopcount {name}" in capsys.readouterr().out
