"""Steady steps are closed from what the last step derived (Meter._close_step, StepRows,
StepWindow's repeated breakdowns, StepAccumulator's recipe): every number must stay what a step
booked. A linear layer trained with SGD through steady steps, a step of another batch size (new
keys), steady again, then steps with a no-grad forward (provisional work, settled at the close)
and an evaluation: closed forms per step, in the records, the trace rows and the summaries of
both backends."""
from __future__ import annotations

import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import flopcount
from flopcount.accounting import StepAccumulator, StepRecord, StepWindow
from flopcount.capture import native

IN, OUT, LR = 8, 6, 0.1
# Batch size of each step; "no_grad": an extra no-grad forward of batch 2 inside the step (work
# that fed the step: no_grad_training); "eval": a held-out evaluation forward of batch 3.
STEPS = [(4, None)] * 5 + [(7, None)] + [(4, None)] * 5 + [(4, "no_grad")] * 3 + [(4, "eval")] * 2 + [(4, None)] * 3
NO_GRAD_BATCH, EVAL_BATCH = 2, 3
FLUSH_EVERY = 4  # trace windows that start and end inside runs of repeated steps
BACKENDS = ["dispatch"] + (["native"] if native.load_error() is None else [])


def mm(batch: int) -> int:
    return 2 * batch * IN * OUT  # one multiply-add per (row, in, out): 2 FLOP


def expected(batch: int, extra) -> dict[tuple, int]:
    """The step's FLOPs by (phase, category, module, op): forward product, the loss's sum (one add
    per output element), the weight-gradient product (the input needs no gradient), SGD's update
    (a multiply and an add per weight), and the extra forward's product in its phase."""
    flops = {("forward", "matmul", "0", "aten.mm"): mm(batch),
             ("forward", "reduction", "<none>", "aten.sum"): batch * OUT,
             ("backward", "matmul", "0", "aten.mm"): mm(batch),
             ("optimizer", "pointwise", "<none>", "aten.add_"): 2 * IN * OUT}
    if extra == "no_grad":
        flops[("no_grad_training", "matmul", "0", "aten.mm")] = mm(NO_GRAD_BATCH)
    if extra == "eval":
        flops[("eval", "matmul", "0", "aten.mm")] = mm(EVAL_BATCH)
    return flops


def run(backend: str, out) -> tuple[flopcount.Meter, list[StepRecord]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(out, backend=backend, warn=False, flush_every=FLUSH_EVERY, run_id="steady") as m:
            for batch, extra in STEPS:
                if extra == "no_grad":
                    with torch.no_grad():
                        model(torch.randn(NO_GRAD_BATCH, IN))
                if extra == "eval":
                    with torch.no_grad(), m.evaluating():
                        model(torch.randn(EVAL_BATCH, IN))
                model(torch.randn(batch, IN)).sum().backward()
                opt.step()
                opt.zero_grad()
                records.append(m.step(tokens=batch, samples=batch))
    assert m.backend == backend
    return m, records


def table(out, name: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / name).glob("*.parquet"))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_steps_keep_every_number(backend, tmp_path):
    m, records = run(backend, tmp_path / "trace")
    for i, ((batch, extra), record) in enumerate(zip(STEPS, records)):
        assert record.step == i and record.tokens == batch
        assert dict(record.flops) == expected(batch, extra), i
        assert dict(record.calls) == {(op, phase): 1 for phase, _, _, op in expected(batch, extra)}, i
    # A step that books what the last one booked, keys in the same order, shares its settled
    # dicts: only steps of the same kind do, and the last of each run of three or more does
    # (the reuse happened: a backend may need a step or two to book new keys in a steady order).
    shared = {i for i in range(1, len(STEPS)) if records[i].flops is records[i - 1].flops}
    assert all(STEPS[i] == STEPS[i - 1] for i in shared)
    run_ends = {i for i in range(2, len(STEPS)) if STEPS[i] == STEPS[i - 1] == STEPS[i - 2]
                and (i + 1 == len(STEPS) or STEPS[i + 1] != STEPS[i])}
    assert run_ends == {4, 10, 13, 18} and run_ends <= shared

    steps = table(tmp_path / "trace", "steps").to_pylist()
    assert [row["step"] for row in steps] == list(range(len(STEPS)))
    for (batch, extra), row in zip(STEPS, steps):
        flops = expected(batch, extra)
        assert row["hardware_flops"] == sum(flops.values())
        assert row["training_flops"] == sum(f for (phase, *_), f in flops.items() if phase != "eval")
        assert row["cat_matmul"] == sum(f for (_, category, *_), f in flops.items() if category == "matmul")
        assert row["phase_eval"] == (mm(EVAL_BATCH) if extra == "eval" else 0)
        assert row["phase_user"] == (mm(NO_GRAD_BATCH) if extra == "no_grad" else 0)  # no_grad_training
        assert row["tokens"] == batch and row["trailing"] is False

    # Breakdown rows: each window's sums by key are those of its steps.
    breakdown = table(tmp_path / "trace", "breakdown").to_pylist()
    windows = sorted({(r["first_step"], r["last_step"]) for r in breakdown})
    assert windows == [(s, min(s + FLUSH_EVERY, len(STEPS)) - 1) for s in range(0, len(STEPS), FLUSH_EVERY)]
    for first, last in windows:
        rows = [r for r in breakdown if (r["first_step"], r["last_step"]) == (first, last)]
        flops, calls = {}, {}
        for batch, extra in STEPS[first:last + 1]:
            for key, f in expected(batch, extra).items():
                flops[key] = flops.get(key, 0) + f
                calls[(key[3], key[0])] = calls.get((key[3], key[0]), 0) + 1
        keyed = {(r["phase"], r["category"], r["module"], r["op"]): r["value"] for r in rows if r["kind"] == "flops"}
        assert keyed == flops
        assert {(r["op"], r["phase"]): r["value"] for r in rows if r["kind"] == "calls"} == calls
        assert all(r["training"] == (r["phase"] != "eval") for r in rows if r["kind"] == "flops")
        assert len(rows) == len(flops) + len(calls)

    total = {}
    for batch, extra in STEPS:
        for key, f in expected(batch, extra).items():
            total[key] = total.get(key, 0) + f
    live, written = m.summary(), flopcount.summarize(tmp_path / "trace")
    for summary in (live, written):
        assert summary["hardware_flops"] == sum(total.values())
        assert summary["training_flops"] == sum(f for (phase, *_), f in total.items() if phase != "eval")
        assert summary["by_phase"]["eval"] == 2 * mm(EVAL_BATCH)
        assert summary["by_module"]["0"] == sum(f for (_, _, module, _), f in total.items() if module == "0")
        assert summary["steps"] == len(STEPS)
    assert m.training_flops == live["training_flops"] and m.hardware_flops == live["hardware_flops"]
    for key in ("training_flops", "hardware_flops", "by_phase", "by_category", "by_phase_category", "by_module",
                "by_module_training", "by_op", "steps", "tokens", "samples", "uncounted_ops", "dark_modules"):
        assert live[key] == written[key], key


@pytest.mark.skipif(len(BACKENDS) < 2, reason="native backend unavailable")
def test_both_backends_write_the_same_trace_rows_and_summary(tmp_path):
    results = {backend: run(backend, tmp_path / backend) for backend in BACKENDS}
    keep = ["step", "tokens", "samples", "training_flops", "hardware_flops", "phase_forward", "phase_backward",
            "phase_optimizer", "phase_eval", "phase_user", "cat_matmul", "cat_reduction", "cat_pointwise"]
    steps = {b: table(tmp_path / b, "steps").select(keep).to_pylist() for b in BACKENDS}
    breakdown = {b: table(tmp_path / b, "breakdown").drop_columns(["run_id", "segment"]).to_pylist() for b in BACKENDS}
    assert steps["native"] == steps["dispatch"]
    assert breakdown["native"] == breakdown["dispatch"]  # the same rows in the same order
    summaries = {b: m.summary() for b, (m, _) in results.items()}
    for key in ("training_flops", "hardware_flops", "by_phase", "by_category", "by_phase_category", "by_module",
                "by_op", "steps", "tokens", "samples", "uncounted_ops", "dark_modules"):
        assert summaries["native"][key] == summaries["dispatch"][key], key


def test_a_window_sums_a_repeated_breakdown_as_its_steps():
    """Steps sharing one breakdown (a steady loop's StepRows) are summed once, times the steps:
    the same record batches as the same steps with breakdowns of their own, keys first seen first."""
    def record(step: int, mm_flops: int) -> StepRecord:
        return StepRecord(step=step, start_time=float(step), end_time=step + 1.0, tokens=None, samples=None,
                          flops={("forward", "matmul", "m", "aten.mm"): mm_flops,
                                 ("backward", "matmul", "m", "aten.mm"): 2 * mm_flops},
                          calls={("aten.mm", "forward"): 1, ("aten.mm", "backward"): 1}, uncounted={"x.y": 1})

    plan = [100, 100, 100, 7, 100, 100]
    shared = {100: record(0, 100).to_batches()["breakdown"]}  # one breakdown object for every 100-step
    taken = {}
    for name in ("shared", "own"):
        window = StepWindow(len(plan), lambda name=name: taken.setdefault(name, window.batches(
            {"run_id": "r", "rank": 0, "world_size": 1, "segment": 0, "device_name": None, "device_count": None})))
        for step, flops in enumerate(plan):
            batches = record(step, flops).to_batches()
            if name == "shared" and flops in shared:
                batches["breakdown"] = shared[flops]
            window.add(batches)
    assert taken["shared"]["breakdown"].to_pylist() == taken["own"]["breakdown"].to_pylist()
    assert taken["shared"]["steps"].to_pylist() == taken["own"]["steps"].to_pylist()
    rows = {(r["kind"], r["phase"]): r["value"] for r in taken["shared"]["breakdown"].to_pylist()}
    assert rows[("flops", "backward")] == 2 * sum(plan) and rows[("calls", "forward")] == len(plan)
    assert rows[("uncounted", None)] == len(plan)


def test_an_accumulator_recipe_tells_equal_steps_and_keeps_the_order():
    key = lambda op: ("forward", "matmul", "m", op)  # noqa: E731
    totals = ({key("aten.mm"): 10, key("aten.bmm"): 5}, {("aten.mm", "forward"): 2, ("aten.bmm", "forward"): 1})
    first = ({key("aten.bmm"): 1}, {("aten.bmm", "forward"): 1})  # the native backend's reused totals
    plans = [(((key("aten.add"), 3),), ("aten.add", "forward"), 2), (((key("aten.mm"), 4),), ("aten.mm", "forward"), 1)]

    def step(booked) -> StepAccumulator:
        acc = StepAccumulator()
        acc.add_totals(*first)
        acc.add_totals(*totals)
        acc.add_repeated(booked)
        return acc

    a, b = step(plans), step(list(plans))
    assert a.same_recipe(b)
    # add_totals adds to held keys in place and appends the others in the totals' order; the plans'
    # new key (aten.add) comes last: what adding each item in turn gives.
    assert list(a.flops.items()) == [(key("aten.bmm"), 1 + 5), (key("aten.mm"), 10 + 4), (key("aten.add"), 6)]
    assert list(a.calls.items()) == [(("aten.bmm", "forward"), 2), (("aten.mm", "forward"), 3),
                                     (("aten.add", "forward"), 2)]
    assert list(a.flops.items()) == list(b.flops.items())
    assert not a.same_recipe(step(plans[::-1]))  # the new key would come first: another order
    assert not a.same_recipe(step(plans[:1]))
    equal_copy = StepAccumulator()
    equal_copy.add_totals(*first)
    equal_copy.add_totals(dict(totals[0]), dict(totals[1]))  # equal, but not the same dicts
    equal_copy.add_repeated(plans)
    assert not a.same_recipe(equal_copy) and list(equal_copy.flops.items()) == list(a.flops.items())
    booked_one_by_one = step(plans)
    booked_one_by_one.add("forward", "m", "aten.mm", [("matmul", 1, None)])
    assert booked_one_by_one.recipe is None and booked_one_by_one.flops[key("aten.mm")] == 10 + 4 + 1
