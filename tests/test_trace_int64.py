"""A step of one rank over 2**63 - 1 FLOP (long gradient accumulation on a big model): the meter
never raises at ``m.step()`` or at exit; the trace keeps its int64 columns and gives the step
several ``steps`` rows of the same step number (and a breakdown sum past int64 several rows of
one key), each within int64; every reader adds them up exactly (docs/traces.md, "Integers").

Real meters, real custom ops with registered formulas, real Parquet parts, the real CLI. Closed
forms: a custom op booked ``numel(x) * PER_ELEMENT`` FLOPs, PER_ELEMENT just over 2**62, so two
elements of one call already leave int64.
"""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import flopcount
from flopcount.accounting import StepRecord
from flopcount.conventions import TRAINING_PHASES
from flopcount.summary import step_series
from flopcount.trace import manifest as mf
from flopcount.trace.integrity import check_integrity
from flopcount.trace.reader import open_traces, read_table
from tracegen import cli

INT64_MAX = 2**63 - 1
PER_ELEMENT = 2**62 + 12345  # FLOPs booked per element of huge_matmul's input
NORM_PER_ELEMENT = 7         # and of huge_norm's


@torch.library.custom_op("flopcount_int64::huge_matmul", mutates_args=())
def huge_matmul(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@flopcount.register_formula(huge_matmul, category="matmul")
def huge_matmul_flops(x_shape, *, out_shape):
    return math.prod(x_shape) * PER_ELEMENT


@torch.library.custom_op("flopcount_int64::huge_norm", mutates_args=())
def huge_norm(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@flopcount.register_formula(huge_norm, category="norm")
def huge_norm_flops(x_shape, *, out_shape):
    return math.prod(x_shape) * NORM_PER_ELEMENT


STEP_ELEMENTS = [3, 5, 2]  # huge_matmul's input size in each step: 3, 5 and 2 x PER_ELEMENT FLOPs
TRAILING_ELEMENTS = 4      # after the last step, under no_grad: trailing eval work
TOKENS = 11


def step_flops(elements: int) -> int:
    return elements * PER_ELEMENT + elements * NORM_PER_ELEMENT


def run_huge_steps(out, backend: str) -> flopcount.Meter:
    with flopcount.meter(out=out, backend=backend, flush_every=2) as m:
        for elements in STEP_ELEMENTS:
            x = torch.randn(elements)
            huge_matmul(x)
            huge_norm(x)
            m.step(tokens=TOKENS, samples=1)  # raised BadInput before: the step's FLOPs left int64
        with torch.no_grad(), m.evaluating():
            huge_matmul(torch.randn(TRAILING_ELEMENTS))
    return m


def test_steps_over_int64_are_written_and_summed_exactly(tmp_path, backend):
    run = tmp_path / "run"
    meter = run_huge_steps(run, backend)
    training = sum(step_flops(n) for n in STEP_ELEMENTS)
    trailing = TRAILING_ELEMENTS * PER_ELEMENT
    assert training > 4 * INT64_MAX and all(step_flops(n) > INT64_MAX for n in STEP_ELEMENTS)
    live, written = meter.summary(), flopcount.summarize(run)
    for summary in (live, written):
        assert summary["training_flops"] == training
        assert summary["hardware_flops"] == training + trailing
        assert summary["trailing_flops"] == trailing
        assert summary["by_phase"] == {"forward": training, "eval": trailing}
        assert summary["by_category"]["matmul"] == sum(STEP_ELEMENTS) * PER_ELEMENT + trailing
        assert summary["by_category"]["norm"] == sum(STEP_ELEMENTS) * NORM_PER_ELEMENT
        assert summary["by_op"]["flopcount_int64.huge_matmul"] == {
            "flops": sum(STEP_ELEMENTS) * PER_ELEMENT + trailing, "calls": len(STEP_ELEMENTS) + 1}
        assert summary["steps"] == len(STEP_ELEMENTS)
        assert summary["tokens"] == TOKENS * len(STEP_ELEMENTS) and summary["samples"] == len(STEP_ELEMENTS)
    assert check_integrity(open_traces(run)).verified
    # Per step, through the report's series (grouped by run and step): the closed forms exactly;
    # the trailing row carries the number of the step after the last one.
    series = step_series(open_traces(run))
    assert [(step, flops) for _, step, flops in series] == [
        (i, step_flops(n)) for i, n in enumerate(STEP_ELEMENTS)] + [(len(STEP_ELEMENTS), 0)]
    outputs = {}
    for command in (["verify", run], ["summarize", run, "--json"], ["check", run, "--base-model-flops", "1e24",
                                                                     "--json"], ["report", run, "--format", "json"]):
        result = cli(*command)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        outputs[command[0]] = result.stdout
    summarized, checked = json.loads(outputs["summarize"]), json.loads(outputs["check"])
    assert summarized["training_flops"] == checked["training_flops"] == training
    assert summarized["integrity"]["verified"] is checked["integrity"]["verified"] is True
    report = json.loads(outputs["report"])
    assert report["totals"]["training_flops"] == training
    assert report["series"]["cumulative_training_flops"][-1][-1] == training


def test_a_split_step_keeps_every_row_within_int64_and_consistent(tmp_path):
    run = tmp_path / "run"
    run_huge_steps(run, "dispatch")
    steps = read_table(run, "steps").to_pylist()
    for i, elements in enumerate(STEP_ELEMENTS):
        rows = [r for r in steps if r["step"] == i and not r["trailing"]]
        assert len(rows) == -(-step_flops(elements) // INT64_MAX)  # the fewest rows that hold it
        assert sum(r["hardware_flops"] for r in rows) == sum(r["training_flops"] for r in rows) == step_flops(elements)
        assert sum(r["cat_matmul"] for r in rows) == elements * PER_ELEMENT
        assert sum(r["cat_norm"] for r in rows) == elements * NORM_PER_ELEMENT
        for r in rows:  # each row adds up as one row does: phases and categories to hardware_flops
            assert 0 < r["hardware_flops"] <= INT64_MAX
            assert r["phase_forward"] == r["hardware_flops"] == r["cat_matmul"] + r["cat_norm"]
        # The rows tile the step's time: consecutive slices in proportion to their FLOPs.
        assert all(a["end_time"] == b["start_time"] for a, b in zip(rows, rows[1:]))
        assert [r["tokens"] for r in rows] == [TOKENS] + [None] * (len(rows) - 1)
        span = rows[-1]["end_time"] - rows[0]["start_time"]
        for r in rows:
            assert r["end_time"] - r["start_time"] == pytest.approx(span * r["training_flops"] / step_flops(elements),
                                                                    abs=1e-6)  # Unix seconds: 2.4e-7 s apart
    trailing = [r for r in steps if r["trailing"]]
    assert sum(r["hardware_flops"] for r in trailing) == sum(r["phase_eval"] for r in trailing) == (
        TRAILING_ELEMENTS * PER_ELEMENT)
    assert {r["step"] for r in trailing} == {len(STEP_ELEMENTS)}
    assert len(trailing) == -(-TRAILING_ELEMENTS * PER_ELEMENT // INT64_MAX) == 3
    breakdown = read_table(run, "breakdown").to_pylist()
    matmul_rows = [r["value"] for r in breakdown if r["kind"] == "flops" and r["op"] == "flopcount_int64.huge_matmul"]
    assert all(0 < v <= INT64_MAX for v in matmul_rows)
    assert sum(matmul_rows) == (sum(STEP_ELEMENTS) + TRAILING_ELEMENTS) * PER_ELEMENT
    for path in sorted((run / "steps").glob("*.parquet")) + sorted((run / "breakdown").glob("*.parquet")):
        schema = pq.read_schema(path)  # the schema is unchanged: int64 FLOP columns
        assert schema.field("value" if "breakdown" in path.parts else "hardware_flops").type == pa.int64()


def test_a_run_of_1e23_flop_adds_up_exactly(tmp_path, backend):
    """Run totals far past int64 and float64's 2**53: summed in Python ints, never in int64."""
    elements = 5422  # per step; 4 steps x 5422 x (2**62 + 12345) ~ 1.0e23 FLOP
    run = tmp_path / "run"
    with flopcount.meter(out=run, backend=backend) as m:
        for _ in range(4):
            huge_matmul(torch.randn(elements))
            m.step()
    expected = 4 * elements * PER_ELEMENT
    assert 1e23 <= expected < 1.01e23 and float(expected) != expected  # not exact in float64
    for summary in (m.summary(), flopcount.summarize(run)):
        assert summary["training_flops"] == summary["hardware_flops"] == expected
        assert summary["by_category"]["matmul"] == expected and summary["steps"] == 4
    assert [flops for _, _, flops in step_series(open_traces(run))] == [elements * PER_ELEMENT] * 4
    result = cli("summarize", run, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["training_flops"] == expected
    assert cli("verify", run).returncode == 0


def test_a_long_run_without_steps_closes_at_exit(tmp_path, backend):
    """No step ever closed: the meter closes the whole run into one trailing record at exit."""
    run = tmp_path / "run"
    with flopcount.meter(out=run, backend=backend) as m:
        with torch.no_grad(), m.evaluating():
            huge_matmul(torch.randn(9))
    expected = 9 * PER_ELEMENT
    for summary in (m.summary(), flopcount.summarize(run)):
        assert summary["hardware_flops"] == summary["trailing_flops"] == summary["by_phase"]["eval"] == expected
        assert summary["steps"] == 0 and summary["training_flops"] == 0
    assert cli("verify", run).returncode == 0


def test_split_flops_and_int64_pieces_add_up():
    from flopcount.accounting import int64_pieces, split_flops

    flops = {("forward", "matmul", "m", "a"): 2**62, ("backward", "matmul", "m", "a"): 3 * 2**63 + 1,
             ("forward", "norm", "m", "b"): 0, ("backward", "norm", "m", "b"): 5}
    pieces = split_flops(flops)
    assert len(pieces) == -(-sum(flops.values()) // INT64_MAX)
    assert all(sum(p.values()) <= INT64_MAX for p in pieces)
    assert {k: sum(p.get(k, 0) for p in pieces) for k in flops} == flops
    assert split_flops({("forward", "matmul", "m", "a"): 7}) == [{("forward", "matmul", "m", "a"): 7}]
    assert int64_pieces(INT64_MAX) == [INT64_MAX] and int64_pieces(0) == [0]
    assert int64_pieces(2 * INT64_MAX + 3) == [INT64_MAX, INT64_MAX, 3]
    # A record through to_batches: the rows' FLOP columns add up to the step's, the counts once.
    record = StepRecord(step=4, start_time=10.0, end_time=14.0, tokens=3, samples=None, flops=flops,
                        calls={("a", "forward"): 1}, uncounted={"x": 2}, training_phases=TRAINING_PHASES,
                        collectives={"c": 1}, collective_bytes={"c": 64})
    steps = record.to_batches()["steps"]
    assert len(steps["step"]) == len(pieces) and set(steps["step"]) == {4}
    assert sum(steps["hardware_flops"]) == sum(flops.values()) == sum(steps["training_flops"])
    assert sum(steps["phase_backward"]) == 3 * 2**63 + 6 and sum(steps["cat_norm"]) == 5
    assert steps["uncounted_calls"] == [2] + [0] * (len(pieces) - 1) and sum(steps["collective_bytes"]) == 64
    assert steps["start_time"][0] == 10.0 and steps["end_time"][-1] == 14.0
    assert steps["start_time"][1:] == steps["end_time"][:-1]  # slices of the step's 4 s, by training FLOPs
    shares = [sum(v for k, v in p.items() if k[0] in TRAINING_PHASES) / sum(flops.values()) for p in pieces]
    assert [e - s for s, e in zip(steps["start_time"], steps["end_time"])] == pytest.approx([4.0 * x for x in shares])


# ---- a step of several rows is one step for every per-step reader -----------------------------------

def rows_by_step(run) -> dict[tuple[int, bool], list[dict]]:
    """The steps rows of a one-rank trace by (step, trailing), in file order."""
    out: dict = {}
    for row in read_table(run, "steps").to_pylist():
        out.setdefault((row["step"], bool(row["trailing"])), []).append(row)
    return out


def test_a_split_step_is_one_per_step_flop_rate(tmp_path, backend):
    """The hardware cross-check's per-step FLOP/s: one sample per step (its FLOPs over its time,
    all its rows), not one per row: a step of 3 rows weighed 3 times before."""
    run = tmp_path / "run"
    meter = run_huge_steps(run, backend)
    steps = rows_by_step(run)
    rates = []
    for i, elements in enumerate(STEP_ELEMENTS):
        rows = steps[(i, False)]
        assert len(rows) == -(-step_flops(elements) // INT64_MAX) > 1
        devices = rows[0]["device_count"]
        rates.append(step_flops(elements) / (devices * (rows[-1]["end_time"] - rows[0]["start_time"])))
    rates.sort()
    device = steps[(0, False)][0]["device_name"]
    result = cli("summarize", run, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    for summary in (meter.summary(), flopcount.summarize(run), json.loads(result.stdout)):
        quantiles = summary["hardware_estimate"]["step_rates"][device]
        assert quantiles["steps"] == len(STEP_ELEMENTS)  # 3 steps, 7 rows
        assert quantiles["min"] == pytest.approx(rates[0], rel=1e-9)
        assert quantiles["median"] == pytest.approx(rates[1], rel=1e-9)
        assert quantiles["max"] == pytest.approx(rates[2], rel=1e-9)


def test_a_step_of_several_rows_is_read_in_one_batch(tmp_path):
    """iter_batches never splits a step's rows across batches, however small the batches."""
    from flopcount.trace.reader import iter_batches

    run = tmp_path / "run"
    run_huge_steps(run, "dispatch")
    expected = [len(rows) for rows in rows_by_step(run).values()]  # steps 0-2, then the trailing rows
    assert expected == [-(-step_flops(n) // INT64_MAX) for n in STEP_ELEMENTS] + [
        -(-TRAILING_ELEMENTS * PER_ELEMENT // INT64_MAX)]
    for size in (1, 2):
        batches = list(iter_batches(open_traces(run), "steps", ["run_id", "rank", "segment", "step", "trailing",
                                                                "training_flops"], batch_size=size))
        assert [b.num_rows for b in batches] == expected
        assert all(len(set(b.column("step").to_pylist())) == 1 for b in batches)


def test_the_threshold_is_crossed_at_the_end_of_a_split_step(tmp_path):
    """The Art. 52(1) crossing time is the end of the step whose FLOPs reach the threshold (its
    last row's end), not the end of the row of it that does."""
    from flopcount.compliance.notification import crossing_time_of_traces

    run = tmp_path / "run"
    run_huge_steps(run, "dispatch")
    steps = rows_by_step(run)
    first, second = steps[(0, False)], steps[(1, False)]
    threshold = step_flops(STEP_ELEMENTS[0]) + 1  # reached by the first row of step 1
    assert second[0]["training_flops"] >= 1 and second[0]["end_time"] < second[-1]["end_time"]
    assert crossing_time_of_traces(open_traces(run), threshold) == second[-1]["end_time"]
    assert crossing_time_of_traces(open_traces(run), step_flops(STEP_ELEMENTS[0])) == first[-1]["end_time"]


TRAILING_TRAINING_ELEMENTS = 4  # after segment 0's last step, with grad on: trailing training work
RESUMED_ELEMENTS = [2, 1]       # segment 1's steps


def run_resumed_with_trailing_work(run, backend):
    """Segment 0: steps 0-1 of STEP_ELEMENTS[:2], then a forward with grad on and no optimizer step
    (trailing training work: its row takes number 2); segment 1 (resumed): steps 2-3, then an
    evaluation (a trailing row numbered 4, no training FLOPs)."""
    for elements, trailing in ((STEP_ELEMENTS[:2], TRAILING_TRAINING_ELEMENTS), (RESUMED_ELEMENTS, None)):
        with flopcount.meter(out=run, backend=backend, flush_every=2) as m:
            for n in elements:
                x = torch.randn(n)
                huge_matmul(x)
                huge_norm(x)
                m.step(tokens=TOKENS)
            if trailing:
                huge_matmul(torch.randn(trailing))
            else:
                with torch.no_grad(), m.evaluating():
                    huge_norm(torch.randn(3))


def test_a_trailing_row_and_the_resumed_step_of_its_number_stay_apart(tmp_path, backend):
    """A trailing row carries the number of the step after it, which a resumed segment's first step
    takes: the report's per-step series keeps the two apart (the trailing work first), and the
    report's runs say the last step, not the trailing row's number."""
    run = tmp_path / "run"
    run_resumed_with_trailing_work(run, backend)
    trailing = TRAILING_TRAINING_ELEMENTS * PER_ELEMENT
    expected = ([(0, step_flops(STEP_ELEMENTS[0])), (1, step_flops(STEP_ELEMENTS[1])), (2, trailing)]
                + [(2 + i, step_flops(n)) for i, n in enumerate(RESUMED_ELEMENTS)] + [(4, 0)])
    assert [(step, flops) for _, step, flops in step_series(open_traces(run))] == expected
    steps = rows_by_step(run)
    assert {key for key in steps if key[1]} == {(2, True), (4, True)}
    assert len(steps[(2, True)]) == -(-trailing // INT64_MAX) == 3
    assert len(steps[(2, False)]) == -(-step_flops(RESUMED_ELEMENTS[0]) // INT64_MAX) == 2
    result = cli("report", run, "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    cumulative, running = [], 0
    for step, flops in expected:
        running += flops
        cumulative.append(running)
    assert [p[2] for p in report["series"]["cumulative_training_flops"]] == [step for step, _ in expected]
    assert [p[3] for p in report["series"]["cumulative_training_flops"]] == cumulative
    assert cumulative[-1] == report["totals"]["training_flops"]
    assert report["totals"]["steps"] == 4
    (runs,) = report["project"]["runs"]
    assert (runs["first_step"], runs["last_step"], runs["segments"]) == (0, 3, 2)


def read_entries(path):
    return mf.parse(path.read_bytes(), str(path))


def write_entries(path, entries):
    """Write ``entries`` with their chain recomputed (prev and hash), as anyone can without a key."""
    prev, sealed = mf.GENESIS, []
    for entry in entries:
        entry = dict(entry, prev=prev)
        entry["hash"] = prev = mf.entry_hash(entry)
        sealed.append(entry)
    path.write_bytes(mf.dumps(sealed))


def test_the_close_entry_counts_optimizer_steps_and_rows(tmp_path, backend):
    """``steps`` in a close entry is the segment's optimizer steps (a split step once, a trailing
    row not at all), ``rows`` its steps rows; verify checks both against what the files hold, and
    still accepts a close without ``rows`` whose ``steps`` counts the rows (older writers)."""
    run = tmp_path / "run"
    run_resumed_with_trailing_work(run, backend)
    rows = read_table(run, "steps").to_pylist()
    path = run / "manifest" / "r00000.jsonl"
    closes = [e for e in read_entries(path) if e["type"] == "close"]
    assert [(c["segment"], c["steps"]) for c in closes] == [(0, 2), (1, 2)]
    assert [c["rows"] for c in closes] == [sum(r["segment"] == s for r in rows) for s in range(2)]
    assert closes[0]["rows"] == (sum(-(-step_flops(n) // INT64_MAX) for n in STEP_ELEMENTS[:2])
                                 + -(-TRAILING_TRAINING_ELEMENTS * PER_ELEMENT // INT64_MAX)) == 2 + 3 + 3
    assert cli("verify", run).returncode == 0

    def with_close(**change):
        entries = read_entries(path)
        close = [e for e in entries if e["type"] == "close"][0]
        for key, value in change.items():
            if value is None:
                close.pop(key, None)
            else:
                close[key] = value
        write_entries(path, entries)
        return check_integrity(open_traces(run)).problems, cli("verify", run)

    problems, result = with_close(steps=closes[0]["rows"])  # what the writer recorded as steps before
    assert problems == [f"manifest/r00000.jsonl segment 0: its close counts {closes[0]['rows']} steps, its parts 2"]
    assert result.returncode == 1 and problems[0] in result.stdout + result.stderr
    problems, result = with_close(steps=2, rows=closes[0]["rows"] - 1)
    assert problems == [f"manifest/r00000.jsonl segment 0: its close counts {closes[0]['rows'] - 1} rows, its "
                        f"parts {closes[0]['rows']}"] and result.returncode == 1
    # A close written before rows were recorded: steps counted the rows, and still verifies.
    problems, result = with_close(steps=closes[0]["rows"], rows=None)
    assert problems == [] and result.returncode == 0 and "verified" in result.stdout
    problems, result = with_close(steps=2, rows=None)  # such a close counting steps disagrees with the rows
    assert problems == [f"manifest/r00000.jsonl segment 0: its close counts 2 steps (rows, as flopcount counted "
                        f"them before it recorded rows), its parts {closes[0]['rows']}"] and result.returncode == 1
