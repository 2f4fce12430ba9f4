"""The native backend gives the same results as the dispatch backend, without Python per op.

Every scenario runs the same workload under both backends and compares the summaries (all keys
except timing and the backend's name); a few pin closed-form numbers as well.
"""
from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import flopcount
from flopcount.capture import native
from flopcount.capture.counter import UncountedOpError

from conftest import tiny_llama

pytestmark = pytest.mark.skipif(native.load_error() is not None,
                                reason=f"native backend unavailable: {native.load_error()}")

# Wall-clock facts (and what is derived from them) differ between any two runs.
_TIMING = {"start_time", "end_time", "duration_s", "backend", "time", "hardware_estimate", "energy"}


def _comparable(summary: dict) -> dict:
    """Everything but timing. Per op, FLOPs and calls with in-place variants merged: under a
    TorchDispatchMode autograd accumulates gradients out of place (aten.add), because the mode
    holds extra references; without it, in place (aten.add_). Same FLOPs, different op name."""
    out = {k: v for k, v in summary.items() if k not in _TIMING and k != "by_op"}
    if isinstance(out.get("method"), dict):
        out["method"] = {k: v for k, v in out["method"].items() if k not in _TIMING}
    by_op: dict = {}
    for op, row in summary["by_op"].items():
        flops, calls = by_op.get(op.rstrip("_"), (0, 0))
        by_op[op.rstrip("_")] = (flops + row["flops"], calls + row["calls"])
    out["by_op"] = by_op
    return out


def _both(workload, **options):
    """Run ``workload(meter)`` under each backend (fresh model state each time); the summaries,
    and the calls per (op, phase) of the last step are checked to agree."""
    out, calls = {}, {}
    for backend in ("dispatch", "native"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with flopcount.meter(backend=backend, warn=False, **options) as m:
                workload(m)
        assert m.backend == backend
        out[backend] = m.summary()
        calls[backend] = _merged_calls(m.last_step.calls if m.last_step else {})
    assert calls["dispatch"] == calls["native"]
    return out["dispatch"], out["native"]


def _merged_calls(calls: dict) -> dict:
    merged: dict = {}
    for (op, phase), n in calls.items():
        merged[(op.rstrip("_"), phase)] = merged.get((op.rstrip("_"), phase), 0) + n
    return merged


def _assert_same(dispatch: dict, native_summary: dict) -> None:
    a, b = _comparable(dispatch), _comparable(native_summary)
    diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert not diff, diff


def _llama_steps(steps=2, *, autocast=False, checkpoint=None, explicit=True, batch=2, seq=16, **cfg):
    def workload(m):
        model = tiny_llama(**cfg)
        if checkpoint is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpoint})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        ids = torch.randint(0, 128, (batch, seq))
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if explicit:
                m.step(tokens=ids.numel())
    return workload


def test_older_torch_is_refused_before_building(monkeypatch):
    """torch < 2.7 lacks RecordFunction::overload_name: the extension is not built there, and
    the reason names the version (backend='auto' then falls back to dispatch with it)."""
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    module, why = native._load.__wrapped__()  # the uncached loader: the real one stays as it is
    assert module is None
    assert why == "it needs torch >= 2.7 (RecordFunction::overload_name); this is torch 2.6.0+cu124"


# ---- identical summaries ---------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", [
    dict(),
    dict(autocast=True),
    dict(checkpoint=True),
    dict(checkpoint=False),
    dict(explicit=False, steps=3),
])
def test_llama_training_same_summary(scenario):
    dispatch, native_summary = _both(_llama_steps(**scenario))
    _assert_same(dispatch, native_summary)
    assert native_summary["training_flops"] > 0
    assert native_summary["steps"] == scenario.get("steps", 2)
    if scenario.get("checkpoint") is not None:
        assert native_summary["by_phase"]["recompute"] > 0


def test_eval_user_phase_and_modules_same_summary():
    model = tiny_llama()  # built outside the meter: its initialisation's no-grad ops are in no step
    ids = torch.randint(0, 128, (2, 8))

    def workload(m):
        with torch.no_grad(), m.evaluating():
            model(input_ids=ids)  # eval
        with torch.no_grad():
            model(input_ids=ids)  # no-grad work in a step that runs backward: no_grad_training
        with m.phase("generation"):
            with torch.no_grad():
                model(input_ids=ids)
        with m.phase("scoring", training=False):
            model(input_ids=ids).logits.sum().backward()
        m.step()
        with torch.no_grad():
            model(input_ids=ids)  # no backward in its (trailing) record: eval
        model.zero_grad(set_to_none=True)  # the next backend's backward starts from no gradients too

    dispatch, native_summary = _both(workload, module_depth=3)
    _assert_same(dispatch, native_summary)
    for phase in ("eval", "no_grad_training", "generation", "scoring", "backward"):
        assert native_summary["by_phase"][phase] > 0, phase
    assert native_summary["by_phase"]["generation"] == native_summary["by_phase"]["no_grad_training"]
    assert "model.layers.0" in native_summary["by_module"]


def test_inference_mode_sees_composite_ops_like_dispatch():
    x, w = torch.randn(8, 16), torch.randn(32, 16)

    def workload(m):
        with torch.inference_mode():
            F.linear(x, w)
        F.linear(x, w)

    dispatch, native_summary = _both(workload)
    _assert_same(dispatch, native_summary)
    # under inference mode the composite aten.linear itself is seen (with its own formula), not its mm
    assert native_summary["hardware_flops"] == 2 * (2 * 8 * 16 * 32)
    assert native_summary["by_op"]["aten.linear"] == {"flops": 2 * 8 * 16 * 32, "calls": 1}
    assert native_summary["uncounted_ops"] == {}


def test_closed_form_matmul_and_autocast_recall_counted_once():
    a, b = torch.randn(4, 32, 64), torch.randn(4, 64, 16)

    def workload(m):
        torch.bmm(a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.bmm(a, b)  # the autocast kernel calls bmm again below itself

    dispatch, native_summary = _both(workload)
    _assert_same(dispatch, native_summary)
    assert native_summary["by_category"]["matmul"] == 2 * (2 * 4 * 32 * 64 * 16)
    assert native_summary["by_op"]["aten.bmm"]["flops"] == 2 * (2 * 4 * 32 * 64 * 16)


def test_distinct_shapes_and_scalars_are_separate_keys():
    def workload(m):
        for n in (3, 5, 7):
            torch.randn(n, n).mm(torch.randn(n, n))
        x = torch.randn(10)
        for _ in range(4):
            torch.add(x, x, alpha=2.0)
        F.gelu(x, approximate="tanh")
        F.gelu(x)

    dispatch, native_summary = _both(workload)
    _assert_same(dispatch, native_summary)
    assert native_summary["by_op"]["aten.mm"]["flops"] == sum(2 * n ** 3 for n in (3, 5, 7))


@torch.library.custom_op("flopcount_native_tests::scale", mutates_args=())
def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


FORMULA_CALLS: list[tuple] = []


@flopcount.register_formula(_scale, category="pointwise")
def _scale_flops(x_shape, factor, *, out_shape):
    FORMULA_CALLS.append((tuple(x_shape), factor))
    return math.prod(x_shape)


class _Scale(torch.nn.Module):
    def forward(self, x):
        return _scale(x, 2.0)


def test_formula_runs_once_per_distinct_arguments_whatever_the_module():
    """Keys that differ only in module (every block of a model has the same shapes) evaluate the
    formula once per meter; each module still gets its own FLOPs."""
    blocks = torch.nn.Sequential(*(_Scale() for _ in range(3)))
    FORMULA_CALLS.clear()
    with flopcount.meter(backend="native", warn=False) as m:
        blocks(torch.randn(4, 5))
        _scale(torch.randn(3, 5), 2.0)
    summary = m.summary()
    assert sorted(FORMULA_CALLS) == [((3, 5), 2.0), ((4, 5), 2.0)]
    assert summary["by_op"]["flopcount_native_tests.scale"] == {"flops": 3 * 20 + 15, "calls": 4}
    assert [summary["by_module"][f"{i}"] for i in range(3)] == [20, 20, 20]


# ---- uncounted ops and strict mode -------------------------------------------------------------

def _uncounted_op():
    x = torch.randn(6, 6)
    return lambda: torch.linalg.qr(x)  # no formula for QR


def test_uncounted_ops_reported_alike():
    qr = _uncounted_op()

    def workload(m):
        qr()
        qr()

    dispatch, native_summary = _both(workload)
    _assert_same(dispatch, native_summary)
    assert sum(native_summary["uncounted_ops"].values()) >= 2


@pytest.mark.parametrize("backend", ["dispatch", "native"])
def test_strict_mode_raises_for_uncounted_op(backend):
    qr = _uncounted_op()
    x = torch.randn(3, 3)
    with pytest.raises(UncountedOpError, match="uncounted"):
        with flopcount.meter(backend=backend, strict=True) as m:
            x + x
            qr()
            torch.nn.Linear(3, 3)(x)  # the native backend raises at the next module boundary
    assert m.summary()["hardware_flops"] == 9  # the add before the error is kept


# ---- tensor subclasses -------------------------------------------------------------------------

def test_dtensor_counts_local_ops_once(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        mesh = init_device_mesh("cpu", (1,))
        a = distribute_tensor(torch.randn(16, 8), mesh, [Shard(0)])
        b = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])

        def workload(m):
            torch.mm(a, b)

        dispatch, native_summary = _both(workload)
    finally:
        dist.destroy_process_group()
    _assert_same(dispatch, native_summary)
    assert native_summary["by_op"]["aten.mm"]["flops"] == 2 * 16 * 8 * 4  # local op only, not the wrapper too


# ---- value-dependent formulas ------------------------------------------------------------------

def test_value_dependent_formula_reads_offsets_on_host():
    lib = torch.library.Library("fcnativetest", "DEF")
    lib.define("segment_mm(Tensor x, Tensor w, Tensor offs) -> Tensor")
    lib.impl("segment_mm", lambda x, w, offs: x @ w, "CompositeExplicitAutograd")
    op = torch.ops.fcnativetest.segment_mm.default

    def segment_flops(x, w, offs, *, out=None):
        # only the rows up to the last offset are multiplied: needs the offsets' values
        return 2 * int(offs[-1]) * w.shape[0] * w.shape[1]

    flopcount.register_formula(op, segment_flops, category="matmul", needs_values=True)
    x, w = torch.randn(10, 4), torch.randn(4, 3)

    def workload(m):
        op(x, w, torch.tensor([2, 5], dtype=torch.int32))
        op(x, w, torch.tensor([3, 7], dtype=torch.int32))

    dispatch, native_summary = _both(workload)
    _assert_same(dispatch, native_summary)
    assert native_summary["by_op"]["fcnativetest.segment_mm"]["flops"] == 2 * (5 + 7) * 4 * 3


# ---- no Python per op ------------------------------------------------------------------------------

def test_no_python_runs_per_op():
    x = torch.randn(4)
    calls = {"flopcount": 0}

    def profiler(frame, event, arg):
        if event == "call" and "flopcount" in frame.f_code.co_filename:
            calls["flopcount"] += 1

    with flopcount.meter(backend="native") as m:
        sys.setprofile(profiler)
        try:
            for _ in range(500):
                torch.add(x, x)
        finally:
            sys.setprofile(None)
    assert calls["flopcount"] == 0
    assert m.summary()["by_op"]["aten.add"] == {"flops": 500 * 4, "calls": 500}


def test_auto_backend_picks_native_and_nested_meters_count_their_blocks():
    x = torch.randn(5, 5)
    with flopcount.meter() as outer:
        x @ x
        with flopcount.meter() as inner:
            x @ x
    assert (outer.backend, inner.backend) == ("native", "native")
    assert outer.summary()["hardware_flops"] == 2 * inner.summary()["hardware_flops"] == 2 * 2 * 5 ** 3


def test_native_unavailable_is_one_line_error(monkeypatch):
    monkeypatch.setattr(native, "_load", lambda: (None, "disabled for this test"))
    with pytest.raises(RuntimeError, match="backend='native' is not available here: disabled for this test"):
        with flopcount.meter(backend="native"):
            pass
    with pytest.warns(UserWarning, match="native backend unavailable"):
        with flopcount.meter() as m:
            torch.ones(2) + 1
    assert m.backend == "dispatch"


def test_memory_stays_bounded_over_many_steps():
    """The extension's tables are emptied at every step: distinct keys do not pile up."""
    x = torch.randn(8, 8)
    with flopcount.meter(backend="native") as m:
        for step in range(200):
            x @ x
            m.step()
        generations, new_keys, _, _ = native.load().drain(m.capture.slot)
    assert sum(len(repeated) + len(calls) for repeated, calls, _ in generations) == 0  # step() emptied them
    assert new_keys == {} and len(m.capture.keys) == 1  # one distinct key, sent once
    assert m.summary()["steps"] == 200
    assert m.summary()["by_op"]["aten.mm"] == {"flops": 200 * 2 * 8 ** 3, "calls": 200}
    assert math.isfinite(m.summary()["training_flops"])


def test_cli_info_reports_backend_and_build():
    import json
    import subprocess

    command = [sys.executable, "-c", "import sys; from flopcount.cli import main; sys.exit(main())", "info", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["torch"] == torch.__version__
    assert facts["active_backend"] == "native"
    assert facts["native_extension"] == "built" and facts["native_error"] is None
