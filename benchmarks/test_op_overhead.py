"""Added time per aten op, and memory over many steps, for each way of seeing ops.

Kinds: an empty TorchDispatchMode (the floor of any Python-per-op capture), torch's
FlopCounterMode, flopcount's dispatch backend and flopcount's native backend. The workload is a
loop of small CPU ops (add / mul on 64-element tensors) so that the per-op cost dominates.

Run with pytest-benchmark (`make bench`), or `python benchmarks/test_op_overhead.py` for one run
of every figure (ns per op, ratios, step overhead, memory) as a Markdown table for RESULTS.md.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import flopcount

OPS_PER_ROUND = 2000  # two ops per loop iteration
KINDS = ["baseline", "empty_dispatch_mode", "flopcountermode", "dispatch", "native"]


class EmptyMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def metered(kind: str):
    if kind == "baseline":
        return contextlib.nullcontext()
    if kind == "empty_dispatch_mode":
        return EmptyMode()
    if kind == "flopcountermode":
        return FlopCounterMode(display=False)
    return flopcount.meter(backend=kind, warn=False)


def op_loop(x, y) -> None:
    for _ in range(OPS_PER_ROUND // 2):
        torch.add(x, y)
        torch.mul(x, y)


def _skip_unavailable(kind: str) -> None:
    if kind == "native":
        from flopcount.capture import native

        if native.load() is None:
            pytest.skip(f"native backend unavailable: {native.load_error()}")


@pytest.mark.parametrize("kind", KINDS)
def test_op_overhead(benchmark, kind):
    """Per-op cost: (median(kind) - median(baseline)) / OPS_PER_ROUND."""
    _skip_unavailable(kind)
    torch.set_num_threads(1)
    x, y = torch.randn(64), torch.randn(64)
    with metered(kind):
        benchmark.pedantic(op_loop, args=(x, y), rounds=30, iterations=1, warmup_rounds=3)


def test_native_memory_flat_over_1000_steps(benchmark):
    """Resident memory after 1,000 metered steps is that after 100: nothing grows with steps."""
    _skip_unavailable("native")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters())
    grows = benchmark.pedantic(memory_growth, args=(model, opt, 1000, 100), rounds=1, iterations=1)
    assert grows < 2 * 2 ** 20, f"resident memory grew by {grows} bytes from step 100 to 1000"


# ---- measurement helpers (also used by the one-run report below) -------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_growth(model, opt, steps: int, checkpoint: int, backend: str = "native") -> int:
    """Resident-set growth between step ``checkpoint`` and step ``steps`` (bytes)."""
    x = torch.randn(16, 32)
    rss_at = {}
    with flopcount.meter(backend=backend, warn=False) as m:
        for step in range(1, steps + 1):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            m.step(tokens=16)
            if step in (checkpoint, steps):
                gc.collect()
                rss_at[step] = _rss()
    return rss_at[steps] - rss_at[checkpoint]


def _median_time(fn, rounds: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(rounds):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def per_op_ns(rounds: int = 30) -> dict[str, float]:
    """Added ns per op for every kind, measured interleaved in one run."""
    torch.set_num_threads(1)
    x, y = torch.randn(64), torch.randn(64)
    samples: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(rounds):  # interleave kinds so that drift affects all alike
        for kind in KINDS:
            with metered(kind):
                op_loop(x, y)  # warm
                # CPU time of this thread: robust to other processes competing for the cores
                samples[kind].append(_median_time(lambda: op_loop(x, y), 3, time.thread_time))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians["baseline"]
    return {k: (medians[k] - base) / OPS_PER_ROUND * 1e9 for k in KINDS} | {"baseline_ns": base / OPS_PER_ROUND * 1e9}


def step_overhead(rounds: int = 8) -> dict[str, float]:
    """Median reference-step CPU time per kind (seconds), interleaved in one run.

    One intra-op thread and the thread's CPU time: the step then runs on this thread alone
    (autograd runs CPU backward on the calling thread), so other processes competing for the
    cores disturb the figure far less than wall time. Each meter's first step is not timed."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from reference_step import build, count_ops, train_step

    torch.set_num_threads(1)
    model, optimizer, ids = build()
    train_step(model, optimizer, ids)

    def timed(meter=None) -> float:
        start = time.thread_time()
        train_step(model, optimizer, ids)
        if isinstance(meter, flopcount.Meter):
            meter.step()  # the native backend books the step here: part of its cost
        return time.thread_time() - start

    kinds = ["baseline", "flopcountermode", "dispatch", "native"]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in kinds:
            with metered(kind) as meter:
                timed(meter)
                samples[kind].extend(timed(meter) for _ in range(2))
    out = {k: statistics.median(v) for k, v in samples.items()}
    out["ops_per_step"] = count_ops(model, optimizer, ids)
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ns = per_op_ns()
    print("\n| capture | added ns per op | vs FlopCounterMode |\n|---|---:|---:|")
    for kind in KINDS[1:]:
        ratio = ns["flopcountermode"] / ns[kind] if ns[kind] > 0 else float("inf")
        print(f"| {kind} | {ns[kind]:.0f} | {ratio:.1f}x less |")
    print(f"(baseline op: {ns['baseline_ns']:.0f} ns)")
    steps = step_overhead()
    base = steps["baseline"]
    print(f"\nreference step (1 thread, CPU time): {steps['ops_per_step']} aten ops, "
          f"baseline median {base * 1e3:.1f} ms")
    print("| capture | step median (ms) | overhead |\n|---|---:|---:|")
    for kind in ("flopcountermode", "dispatch", "native"):
        print(f"| {kind} | {steps[kind] * 1e3:.1f} | {(steps[kind] / base - 1) * 100:+.1f} % |")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    grows = memory_growth(model, torch.optim.AdamW(model.parameters()), steps=1000, checkpoint=100)
    print(f"\nnative, RSS growth from step 100 to step 1000: {grows / 2 ** 20:.2f} MiB")


if __name__ == "__main__":
    main()
