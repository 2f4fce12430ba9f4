"""Whole-step overhead of metering on the reference CPU step, against torch's FlopCounterMode
measured in the same run, and the fixed cost per step on its tiny twin (same modules and op
sequence, negligible compute: reference_step.TWIN). Run: `make bench` (or pytest
benchmarks/test_step_overhead.py --benchmark-only). Compare medians: added time =
median(metered) - median(baseline). Drifts of a shared machine hit these variants unequally
(each runs its rounds in a block); benchmarks/interleaved_step_overhead.py interleaves them."""
from __future__ import annotations

import pytest
import torch

from reference_step import build, metering, train_step


KINDS = ["baseline", "flopcountermode", "dispatch", "native"]


def _run(benchmark, kind: str, twin: bool, rounds: int) -> None:
    if kind == "native":
        from flopcount.capture import native

        if native.load() is None:
            pytest.skip(f"native backend unavailable: {native.load_error()}")
    torch.set_num_threads(2)
    model, optimizer, ids = build(twin=twin)
    train_step(model, optimizer, ids)  # warm-up: allocator, optimizer state, kernels
    with metering(kind):
        benchmark.pedantic(train_step, args=(model, optimizer, ids), rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_step(benchmark, kind):
    _run(benchmark, kind, twin=False, rounds=8)


@pytest.mark.parametrize("kind", KINDS)
def test_twin_step(benchmark, kind):
    _run(benchmark, kind, twin=True, rounds=200)
