"""Whole-step overhead of metering on the reference CPU step, against torch's FlopCounterMode
measured in the same run. Run: `make bench` (or pytest benchmarks/test_step_overhead.py
--benchmark-only). Compare medians: added time = median(metered) - median(baseline)."""
from __future__ import annotations

import pytest
import torch

from reference_step import build, metering, train_step


KINDS = ["baseline", "flopcountermode", "dispatch", "native"]


@pytest.mark.parametrize("kind", KINDS)
def test_reference_step(benchmark, kind):
    if kind == "native":
        from flopcount.capture import native

        if native.load() is None:
            pytest.skip(f"native backend unavailable: {native.load_error()}")
    torch.set_num_threads(2)
    model, optimizer, ids = build()
    train_step(model, optimizer, ids)  # warm-up: allocator, optimizer state, kernels
    with metering(kind):
        benchmark.pedantic(train_step, args=(model, optimizer, ids), rounds=8, iterations=1, warmup_rounds=1)
