"""Per-rank traces of one job in one directory (torchrun, 2 ranks, gloo), merged by the real CLI;
a rank that never wrote, or was killed, is an integrity finding that names it (exit 1), and the
other ranks' traces stay intact and counted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_distributed import launch, results, torchrun


@pytest.fixture(scope="module")
def trace_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("traces")
    proc = launch(torchrun(2, "traces.py", str(out)), out)
    # Rank 1 kills itself at the end (SIGKILL), so the launcher reports a failure.
    assert proc.returncode != 0
    assert "SIGKILL" in proc.stdout + proc.stderr
    return out


def summarize(path) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, "-m", "flopcount.cli", "summarize", str(path), "--json"],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_ranks_write_one_directory_and_merge(trace_runs):
    from flopcount.summary import summarize as summarize_in_process

    ranks = results(trace_runs, "complete", 2)
    manifests = sorted(p.name for p in (trace_runs / "complete" / "manifest").iterdir())
    assert manifests == ["r00000.jsonl", "r00001.jsonl"]
    summary = summarize_in_process(trace_runs / "complete")
    assert summary["ranks"] == [0, 1] and summary["world_size"] == 2
    assert summary["missing_ranks"] == [] and summary["unfinished_ranks"] == [] and summary["rank_problems"] == []
    assert summary["training_flops"] == sum(r["training_flops"] for r in ranks)
    assert summary["hardware_flops"] == sum(r["hardware_flops"] for r in ranks)
    assert summary["steps"] == 2  # distinct steps: the ranks of one step count once
    # Collective columns merge too: the DDP gradient all-reduces of both ranks.
    assert summary["collective_calls"] == sum(r["collective_calls"] for r in ranks) > 0
    assert summary["collective_bytes"] == sum(r["collective_bytes"] for r in ranks)
    # ... and are columns of the steps table: one row per step per rank.
    import flopcount

    steps = flopcount.read_trace(trace_runs / "complete")
    assert len(steps) == 4 and sorted(steps["rank"].unique()) == [0, 1]
    assert int(steps["collective_calls"].sum()) == summary["collective_calls"]
    assert int(steps["collective_bytes"].sum()) == summary["collective_bytes"]


def test_a_rank_that_never_wrote_is_named(trace_runs):
    (rank0,) = results(trace_runs, "missing", 1)
    rc, summary, stderr = summarize(trace_runs / "missing")
    assert rc == 1
    assert summary["missing_ranks"] == [1] and summary["world_size"] == 2 and summary["ranks"] == [0]
    assert "rank 1 of 2 is missing" in stderr
    assert summary["training_flops"] == rank0["training_flops"]


def test_a_killed_rank_keeps_its_flushed_steps_and_is_named(trace_runs):
    ranks = results(trace_runs, "killed", 2)  # rank 1's file: written just before its SIGKILL
    rc, summary, stderr = summarize(trace_runs / "killed")
    assert rc == 1
    assert summary["unfinished_ranks"] == [1] and summary["missing_ranks"] == []
    assert "rank 1 of 2 did not close its trace" in stderr
    # Rank 0's whole run and rank 1's two flushed steps (flush_every=1) are intact and counted.
    assert summary["ranks"] == [0, 1]
    assert summary["training_flops"] == sum(r["training_flops"] for r in ranks)
    assert ranks[1]["steps"] == 2


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flopcount.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("run, problem", [("missing", "rank 1 of 2 is missing"),
                                          ("killed", "rank 1 of 2 did not close its trace")])
def test_check_estimate_verify_and_report_name_a_rank_short(trace_runs, run, problem, tmp_path):
    path = trace_runs / run
    # Far below the threshold, so the finding (exit 1) can only be the rank that is short.
    check = cli("check", path, "--base-model-flops", "1e30", "--json")
    assert check.returncode == 1 and problem in check.stderr
    assert any(problem in p for p in json.loads(check.stdout)["rank_problems"])
    estimate = cli("estimate", path, "--steps", "3", "--base-model-flops", "1e30")
    assert estimate.returncode == 1 and problem in estimate.stderr
    verify = cli("verify", path)
    assert verify.returncode == 1 and problem in verify.stdout
    report = cli("report", path, "--base-model-flops", "1e30", "--format", "json", "-o", tmp_path / "r.json")
    assert report.returncode == 1 and problem in report.stderr  # the report is written, and it is a finding
    integrity = json.loads((tmp_path / "r.json").read_text())["integrity"]
    assert not integrity["verified"] and any(problem in p for p in integrity["problems"])
    # The complete run has no such finding.
    assert cli("check", trace_runs / "complete", "--base-model-flops", "1e30").returncode == 0
    assert cli("verify", trace_runs / "complete").returncode == 0
