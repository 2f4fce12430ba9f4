"""Bad input: every bad flag value, and every Parquet part of the wrong shape, ends in exit 2 and
one line naming the value or the file, never a traceback. Text taken from a trace (run ids,
module names) comes out inert in Markdown, HTML and terminal text."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

import flopcount
from flopcount.cli import main
from tracegen import reseal, train


def flopcount_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flopcount.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input") / "run"
    train(out, steps=4, flush_every=2, base_model="Llama-3.2-1B")
    return out


HUGE = "1" + "0" * 400  # a whole number no float holds

BAD_FLAGS = [
    (["estimate", "{dir}", "--steps", "1e400"], "'1e400' is larger than 2**63 - 1"),
    (["estimate", "{dir}", "--tokens", "1e400"], "'1e400' is larger than 2**63 - 1"),
    (["estimate", "{dir}", "--steps", "99999999999999999999999"], "'99999999999999999999999' is larger"),
    (["estimate", "{dir}", "--steps", "1.5"], "'1.5' is not a whole number"),
    (["estimate", "{dir}", "--steps", "nan"], "'nan' is not a whole number"),
    (["estimate", "{dir}", "--steps", "-3"], "'-3' must be at least 1"),
    (["estimate", "{dir}", "--tokens", "inf"], "'inf' is not a whole number"),
    (["check", "{dir}", "--base-model-flops", "5e-324"], "'5e-324' is less than one FLOP"),
    (["check", "{dir}", "--base-model-flops", "0.5"], "'0.5' is less than one FLOP"),
    (["check", "{dir}", "--base-model-flops", "inf"], "'inf' is not a finite number"),
    (["check", "{dir}", "--base-model-flops", "nan"], "'nan' is not a finite number"),
    (["check", "{dir}", "--base-model-flops", "-1"], "'-1' must be a positive"),
    (["check", "{dir}", "--base-model-flops", "1e41"], "'1e41' is more than 1e40 FLOP"),
    (["check", "{dir}", "--base-model-flops", HUGE], "'1000000000000000000000000000000000000...' is not a finite"),
    (["check", "{dir}", "--approaching", "nan"], "'nan' is not a finite number"),
    (["check", "{dir}", "--approaching", "5e-324"], "'5e-324' is too small"),
    (["check", "{dir}", "--approaching", "-0.5"], "'-0.5' must be in (0, 1]"),
    (["report", "{dir}", "--utilisation", "inf"], "'inf' is not a finite number"),
    (["report", "{dir}", "--steps", "1e400"], "'1e400' is larger than 2**63 - 1"),
    (["summarize", "{dir}", "--top", "1e400"], "'1e400' is larger than 2**63 - 1"),
    (["summarize", "{dir}", "--module-depth", "0"], "'0' must be at least 1"),
    (["verify", "{dir}", "--digest", "not a digest"], "'not a digest' is not a trace digest"),
    (["verify", "{dir}", "--public-key", "{dir}/no-such-key.pem"], "no-such-key.pem' is not a readable file"),
    (["run", "--budget", "5e-324", "--", "true"], "'5e-324' must be a fraction of the threshold in (0, 1]"),
    (["run", "--budget", "nan", "--", "true"], "'nan' is not a finite number"),
    (["run", "--budget", "1e400", "--", "true"], "'1e400' is not a finite number"),
    (["run", "--budget", "-1", "--", "true"], "'-1' must be a fraction of the threshold"),
    (["run", "--budget", "1e41", "--", "true"], "'1e41' is more than 1e40 FLOP"),
    (["run", "--budget-warn-at", "0", "--", "true"], "'0' must be in (0, 1]"),
    (["run", "--base-model-flops", "5e-324", "--", "true"], "'5e-324' is less than one FLOP"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a[:1] + a[2:4]) for a, _ in BAD_FLAGS])
def test_a_bad_flag_value_is_exit_2_naming_it(run_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main([a.format(dir=run_dir) for a in argv]))
    assert exit_info.value.code == 2
    assert message in one_line(capsys.readouterr().err)


def test_huge_flags_in_a_real_process(run_dir):
    for argv, message in [(["estimate", run_dir, "--steps", "1e400"], "'1e400'"),
                          (["check", run_dir, "--base-model-flops", "5e-324"], "'5e-324'")]:
        result = flopcount_cli(*argv)
        assert result.returncode == 2 and message in one_line(result.stderr)
    # The largest values still accepted give finite answers, not overflows.
    result = flopcount_cli("estimate", run_dir, "--steps", 2**63 - 1, "--base-model-flops", "1e40", "--json")
    assert result.returncode == 0, result.stderr
    projection = json.loads(result.stdout)
    per_step = projection["measured_training_flops"] // projection["measured_steps"]
    assert projection["projected_training_flops"] == pytest.approx(per_step * (2**63 - 1))
    assert projection["crossing_step"] == -(-(10**40) // (3 * per_step))  # ceil(threshold / per step)


def _retype(path, column, to_type):
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, pa.field(column, to_type), pc.cast(table.column(index), to_type)), path)


def _drop(path, column):
    table = pq.read_table(path)
    pq.write_table(table.drop_columns([column]), path)


@pytest.mark.parametrize("table, change, problem", [
    ("steps", lambda p: _retype(p, "training_flops", pa.string()), "column 'training_flops' is string, not int64"),
    ("steps", lambda p: _drop(p, "hardware_flops"), "column 'hardware_flops' is missing"),
    ("breakdown", lambda p: _retype(p, "value", pa.float64()), "column 'value' is double, not int64"),
    ("breakdown", lambda p: _drop(p, "kind"), "column 'kind' is missing"),
], ids=["string-flops", "no-hardware-flops", "float-values", "no-kind"])
def test_a_part_with_the_wrong_columns_is_exit_2_naming_it(run_dir, tmp_path, table, change, problem):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    part = run / table / "r00000-000001.parquet"
    change(part)
    # Rewritten in place, the part is not the one the manifest lists: verify's finding, exit 1.
    altered = flopcount_cli("summarize", run)
    assert altered.returncode == 1 and "r00000-000001.parquet: SHA-256 does not match" in altered.stderr
    assert "Traceback" not in altered.stderr
    # With the unkeyed chain recomputed (anyone can), it verifies; reading it is bad input, exit 2.
    reseal(run)
    assert flopcount_cli("verify", run).returncode == 0
    for argv in (["summarize", run], ["check", run, "--json"], ["estimate", run, "--steps", 10],
                 ["report", run, "--format", "json"]):
        result = flopcount_cli(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        line = one_line(result.stderr)
        assert f"{part} is not a {table} part of flopcount.trace/1: {problem}" in line, line


HOSTILE_RUN_ID = "<script>alert(1)</script>\x1b[2J"


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    """A real metered run whose run id and module names carry HTML, Markdown and a terminal escape."""
    out = tmp_path_factory.mktemp("hostile") / "run"

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("a|b", torch.nn.Linear(8, 6, bias=False))
            self.add_module("*x*_[y](javascript:z)", torch.nn.Linear(6, 2, bias=False))

        def forward(self, x):
            return getattr(self, "*x*_[y](javascript:z)")(getattr(self, "a|b")(x))

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with flopcount.meter(out=out, run_id=HOSTILE_RUN_ID, backend="dispatch", base_model_flops=1e22) as meter:
        for _ in range(2):
            net(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            meter.step()
    return out


def _table_rows(markdown: str, first_cell: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith(f"| {first_cell}")]


def test_markdown_html_and_text_escape_what_a_trace_says(hostile_dir):
    md = flopcount_cli("report", hostile_dir, "--format", "md")
    assert md.returncode == 0, md.stderr
    text = md.stdout
    assert "<script>" not in text and "\x1b" not in text
    [identity] = _table_rows(text, "&lt;script&gt;")
    # Rendered: the literal text <script>alert(1)</script>\x1b[2J (the escape written out, not sent).
    assert identity.startswith(r"| &lt;script&gt;alert(1)&lt;/script&gt;\\x1b\[2J |")
    # Each module row keeps its 4 cells: the name's "|" is escaped, not a column break.
    [row] = _table_rows(text, "a\\|b ")
    assert row.replace("\\|", "").count("|") == 5
    [row] = _table_rows(text, "\\*x")
    assert row.startswith("| \\*x\\*\\_\\[y\\](javascript:z) |")  # no emphasis, no link
    cop = flopcount_cli("report", hostile_dir, "--form", "cop", "--format", "md")
    assert cop.returncode == 0 and "<script>" not in cop.stdout and "\x1b" not in cop.stdout
    html = flopcount_cli("report", hostile_dir, "--format", "html")
    assert html.returncode == 0 and "<script>" not in html.stdout and "\x1b" not in html.stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.stdout and "<td>a|b</td>" in html.stdout
    for argv in (["summarize", hostile_dir], ["check", hostile_dir], ["verify", hostile_dir]):
        result = flopcount_cli(*argv)
        assert result.returncode == 0 and "\x1b" not in result.stdout + result.stderr, argv
    assert "<script>alert(1)</script>\\x1b[2J" in flopcount_cli("summarize", hostile_dir).stdout
    # JSON carries the exact value.
    assert json.loads(flopcount_cli("summarize", hostile_dir, "--json").stdout)["run_id"] == HOSTILE_RUN_ID
