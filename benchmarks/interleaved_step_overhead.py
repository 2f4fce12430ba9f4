"""Interleaved whole-step overhead on the reference CPU step: each round runs every variant, so
slow drifts of the machine (frequency, neighbours) hit all variants alike. Prints medians and
minima of the per-round step time, and the added time relative to the baseline.

    python benchmarks/interleaved_step_overhead.py [--rounds 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from reference_step import build, metering, train_step

VARIANTS = ("baseline", "flopcountermode", "dispatch", "native")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, optimizer, ids = build()
    for _ in range(2):
        train_step(model, optimizer, ids)
    times: dict[str, list[float]] = {kind: [] for kind in VARIANTS}
    for _ in range(args.rounds):
        for kind in VARIANTS:
            with metering(kind):
                train_step(model, optimizer, ids)  # first step under a fresh meter: not timed
                start = time.perf_counter()
                train_step(model, optimizer, ids)
                times[kind].append(time.perf_counter() - start)
    base = statistics.median(times["baseline"])
    print(f"{'variant':<16}{'median ms':>10}{'min ms':>9}{'added':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<16}{median * 1e3:>10.1f}{min(values) * 1e3:>9.1f}{100 * (median / base - 1):>+8.1f}%")


if __name__ == "__main__":
    main()
