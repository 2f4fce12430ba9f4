"""Every consumer of a trace runs the one integrity check that `flopcount verify` runs.

`check`, `estimate`, `summarize`, `report` (audit and Code of Practice forms) and the end of
`flopcount run` carry ``integrity: {verified, problems, digest, signed_by}`` in their JSON, exit 1
whenever verify does, print the trace digest, and never say "verified" when verify would not.
Real trace dirs written by a real metered loop; then a part altered, deleted or unlisted; real
`python -m flopcount.cli` subprocesses.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tracegen import train

STEPS = 6  # flush_every=2: three parts per table


def flopcount(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flopcount.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("consumers") / "run"
    train(out, steps=STEPS, flush_every=2, base_model="Llama-3.2-1B")
    return out


def _rewrite(path, column, scale, where=None):
    table = pq.read_table(path)  # keeps the flopcount.schema metadata: the part still reads
    index = table.schema.get_field_index(column)
    values = table.column(index)
    scaled = pc.multiply(values, scale)
    if where is not None:
        scaled = pc.if_else(where(table), scaled, values)
    pq.write_table(table.set_column(index, table.schema.field(index), scaled), path)


def doubled(run):
    """Part 1 of both tables with its FLOPs doubled, consistently: the totals still cross-check."""
    for column in ("training_flops", "hardware_flops"):
        _rewrite(run / "steps" / "r00000-000001.parquet", column, 2)
    _rewrite(run / "breakdown" / "r00000-000001.parquet", "value", 2,
             where=lambda t: pc.equal(t.column("kind"), "flops"))
    return "r00000-000001.parquet: SHA-256 does not match"


def deleted(run):
    for table in ("steps", "breakdown"):
        (run / table / "r00000-000001.parquet").unlink()
    return "r00000-000001.parquet: missing"


def unlisted(run):
    for table in ("steps", "breakdown"):
        shutil.copy(run / table / "r00000-000002.parquet", run / table / "r00000-000003.parquet")
    return "r00000-000003.parquet: not listed in any manifest"


@pytest.fixture(params=[doubled, deleted, unlisted], ids=lambda f: f.__name__)
def tampered(request, pristine, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    return run, request.param(run)


def consumers(run, out_dir):
    """(name, argv, JSON output file or None for stdout) of every consumer."""
    return [
        ("summarize", ["summarize", run, "--json"], None),
        ("check", ["check", run, "--json"], None),
        ("estimate", ["estimate", run, "--steps", 100, "--json"], None),
        ("report", ["report", run, "--format", "json", "-o", out_dir / "report.json"], out_dir / "report.json"),
        ("report cop", ["report", run, "--form", "cop", "--format", "json", "-o", out_dir / "cop.json"],
         out_dir / "cop.json"),
    ]


INTEGRITY_KEYS = ("verified", "problems", "digest", "signed_by")


def integrity_of(result, output_file):
    """The output's ``integrity`` block: the four keys every consumer carries (reports add more)."""
    text = output_file.read_text() if output_file is not None else result.stdout
    integrity = json.loads(text)["integrity"]
    assert set(INTEGRITY_KEYS) <= set(integrity)
    return {key: integrity[key] for key in INTEGRITY_KEYS}


def test_every_consumer_carries_the_verified_integrity_and_its_digest(pristine, tmp_path):
    verify = flopcount("verify", pristine, "--json")
    assert verify.returncode == 0, verify.stderr
    facts = json.loads(verify.stdout)
    assert facts["verified"] is True and facts["problems"] == [] and facts["signed_by"] is None
    digest = facts["digest"]
    assert digest.startswith("fc1-") and facts["parts_checked"] == 2 * STEPS // 2  # 3 steps + 3 breakdown parts
    for name, argv, output in consumers(pristine, tmp_path):
        result = flopcount(*argv)
        assert result.returncode == 0, (name, result.stderr)
        assert integrity_of(result, output) == {"verified": True, "problems": [], "digest": digest,
                                                "signed_by": None}, name
    # Text outputs print the digest to keep (`verify --digest D`).
    for argv in (["verify", pristine], ["check", pristine], ["summarize", pristine],
                 ["estimate", pristine, "--steps", 100], ["report", pristine, "-o", tmp_path / "r.md"]):
        result = flopcount(*argv)
        assert result.returncode == 0 and digest in result.stdout, (argv, result.stdout, result.stderr)
    assert digest in (tmp_path / "r.md").read_text()
    # The digest that was printed is the anchor: given back, it verifies; another one is a finding.
    assert flopcount("check", pristine, "--digest", digest).returncode == 0
    wrong = re.sub(r"[0-9a-f]{64}", "0" * 64, digest)  # well-formed, but not this trace's state
    for argv in (["verify", pristine], ["check", pristine], ["summarize", pristine],
                 ["report", pristine, "-o", tmp_path / "r2.md"]):
        result = flopcount(*argv, "--digest", wrong)
        assert result.returncode == 1, (argv, result.stderr)
        assert wrong in result.stdout + result.stderr  # the finding names the digest it was given


def test_every_consumer_exits_1_when_verify_does(tampered, tmp_path):
    run, problem = tampered
    verify = flopcount("verify", run, "--json")
    assert verify.returncode == 1
    facts = json.loads(verify.stdout)
    assert facts["verified"] is False and any(problem in p for p in facts["problems"]), facts
    for name, argv, output in consumers(run, tmp_path):
        result = flopcount(*argv)
        assert result.returncode == 1, (name, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr
        assert problem in result.stderr, (name, result.stderr)
        if output is None and not result.stdout:
            continue  # a deleted part: nothing to summarise, the finding says why
        if output is not None and not output.exists():
            continue
        integrity = integrity_of(result, output)
        assert integrity["verified"] is False and any(problem in p for p in integrity["problems"]), name
        assert integrity["digest"] == facts["digest"], name


def test_doubled_flops_are_not_believed(pristine, tmp_path):
    """The doubled part reads and cross-checks, so the totals grow; only the integrity check knows."""
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    before = json.loads(flopcount("summarize", pristine, "--json").stdout)["training_flops"]
    doubled(run)
    result = flopcount("summarize", run, "--json")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["training_flops"] > before and summary["integrity"]["verified"] is False
    # No text output says "verified" of traces that do not verify.
    for argv in (["check", run], ["summarize", run], ["estimate", run, "--steps", 100],
                 ["report", run, "--format", "md"], ["verify", run]):
        result = flopcount(*argv)
        assert result.returncode == 1, argv
        said = result.stdout + result.stderr
        if argv[0] == "report":
            assert "- **verified**: NO" in said
            said = said.replace("- **verified**: NO", "")
        assert "verified" not in said.replace("NOT verified", "").replace("does not verify", ""), (argv, said)


RUN_SCRIPT = """
import os
import torch

layer = torch.nn.Linear(8, 6, bias=False)
opt = torch.optim.SGD(layer.parameters(), lr=0.1)
for _ in range(int(os.environ["STEPS"])):
    layer(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
os._exit(0)  # killed before the meter closes its trace: the steps after the last flush are lost
"""


def test_flopcount_run_never_says_verified_when_verify_fails(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RUN_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "STEPS": "53"}  # the meter flushes every 50 steps: one part, then the kill
    env.pop("FLOPCOUNT_RUN", None)
    result = subprocess.run([sys.executable, "-m", "flopcount.cli", "run", "--backend", "dispatch", "--out", out,
                             "--", sys.executable, script], capture_output=True, text=True, env=env, timeout=240)
    verify = flopcount("verify", out, "--json")
    assert verify.returncode == 1, verify.stdout
    facts = json.loads(verify.stdout)
    assert any("did not close its trace" in p for p in facts["problems"]), facts
    assert result.returncode == 1, result.stderr[-2000:]  # the command exited 0; its trace does not verify
    assert "flopcount compliance summary" in result.stdout
    assert "verified" not in result.stdout.replace("NOT verified", "")
    assert f"digest {facts['digest']}" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["integrity"]["verified"] is False and report["integrity"]["digest"] == facts["digest"]
