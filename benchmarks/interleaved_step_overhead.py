"""Interleaved whole-step overhead on the reference CPU step: each round runs every variant, so
slow drifts of the machine (frequency, neighbours) hit all variants alike, and each variant's
step is compared with the baseline step of the same round (paired); the order within a round is
shuffled. Prints per variant the
median and minimum step time, the median paired overhead with a bootstrap 95 % interval, and
the added milliseconds.

    python benchmarks/interleaved_step_overhead.py [--rounds 40] [--threads 2]
        [--variants baseline,flopcountermode,dispatch,native,observer_floor] [--malloc steady|default]
        [--clock wall|thread] [--model reference|twin|both] [--twin] [--steps 3] [--json FILE]

Each variant runs under a fresh meter per round. Its first step is not timed; its second is timed
on its own and reported separately, because it closes the meter's first step, which evaluates the
formula of every distinct key once (about 360 keys, 4-8 ms on the reference step, once per
meter); the steady-state figure is the median of the next ``--steps`` steps (3; twin 20), what
every later step of a job pays.

``--model both`` runs the reference step and its twin in one process, one round of each
alternately, so both figures (each with FlopCounterMode) come from the same run and load; the
load average before and after is printed with them. ``--twin`` (``--model twin``) runs the
reference step's tiny twin (reference_step.TWIN: same modules and op
sequence, negligible compute), 20 timed steps per variant and round: the added milliseconds
are then the meter's fixed cost per step, which carries over to the reference step.
``--clock thread`` times the CPU time of the calling thread (with ``--threads 1`` the whole
step runs on it, CPU backward included), which leaves out time stolen by other processes.

``--malloc steady`` (the default) fixes glibc's malloc thresholds before the model is built, so
that the step's large buffers (the 32 MB logits and their gradient) are reused from the heap
instead of being unmapped and faulted in again each step; that page-fault cost varies by
+-15 ms from step to step whatever runs, and it hits every variant alike.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import time

import torch
from reference_step import build, metering, train_step

VARIANTS = ("baseline", "flopcountermode", "dispatch", "native")
EXTRA_VARIANTS = ("native_untracked", "native_recordfunction", "observer_floor", "dispatch_floor", "baseline_unhooked")  # ablations, run only when named (reference_step.metering)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def steady_malloc() -> bool:
    """Keep freed memory in glibc's heap (buffers up to 32 MB, glibc's largest mmap threshold)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def paired_overhead(times: list[float], base: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median over rounds of (variant / baseline of the same round - 1), in per cent, with a
    bootstrap 95 % interval of that median."""
    ratios = [100 * (t / b - 1) for t, b in zip(times, base)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS + EXTRA_VARIANTS)
                   + " (baseline is always run)")
    p.add_argument("--malloc", choices=("steady", "default"), default="steady")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall")
    p.add_argument("--model", choices=("reference", "twin", "both"), default="reference",
                   help="the reference step, its tiny twin, or both in one run (alternating rounds)")
    p.add_argument("--twin", action="store_true", help="the tiny twin of the reference step (--model twin)")
    p.add_argument("--steps", type=int, default=0,
                   help="steady-state steps timed per variant and round (median taken); default 3, twin 20")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = p.parse_args()
    variants = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    unknown = set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}; "
                f"choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    models = ["twin"] if args.twin or args.model == "twin" else ["reference", "twin"] if args.model == "both" \
        else ["reference"]
    steady = args.malloc == "steady" and steady_malloc()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    runs = {name: Run(name, variants, clock, args.steps or (20 if name == "twin" else 3)) for name in models}
    order = random.Random(0)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for run in runs.values():
            run.round(order)
    load_after = os.getloadavg()
    out = {"rounds": args.rounds, "threads": args.threads, "clock": args.clock,
           "malloc": "steady" if steady else "default", "load_average_before": load_before,
           "load_average_after": load_after, "models": {}}
    print(f"{args.rounds} rounds, {args.threads} threads, {args.clock} clock, malloc {'steady' if steady else 'default'}, "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"(15 min: {load_before[2]:.2f}, {load_after[2]:.2f})")
    for run in runs.values():
        print(f"\n{'twin of the ' if run.name == 'twin' else ''}reference step")
        print(f"steady state (median of steps 3-{run.steps + 2} under a fresh meter: what each step of a job pays)")
        steady_rows = report(run.times)
        print("second step under a fresh meter (it books the first step's distinct keys: once per meter)")
        first_rows = report(run.first)
        out["models"][run.name] = {"timed_steps": run.steps, "steady": steady_rows, "second_step": first_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


class Run:
    """One step (the reference step or its twin): its model and the times of every variant."""

    def __init__(self, name: str, variants: list[str], clock, steps: int) -> None:
        self.name, self.variants, self.clock, self.steps = name, variants, clock, steps
        self.model, self.optimizer, self.ids = build(twin=name == "twin")
        for _ in range(3):
            train_step(self.model, self.optimizer, self.ids)
        self.times: dict[str, list[float]] = {kind: [] for kind in variants}  # steady state
        self.first: dict[str, list[float]] = {kind: [] for kind in variants}  # second step (the first booking)

    def timed(self) -> float:
        start = self.clock()
        train_step(self.model, self.optimizer, self.ids)
        return self.clock() - start

    def round(self, order: random.Random) -> None:
        for kind in order.sample(self.variants, len(self.variants)):  # no variant always runs next to the baseline
            with metering(kind):
                train_step(self.model, self.optimizer, self.ids)  # the meter's first step: hooks and keys appear
                self.first[kind].append(self.timed())  # closes the first step: every distinct key is booked once
                self.times[kind].append(statistics.median(self.timed() for _ in range(self.steps)))


def report(times: dict[str, list[float]]) -> dict:
    base = times["baseline"]
    rows = {}
    print(f"{'variant':<16}{'median ms':>10}{'min ms':>9}{'added ms':>10}{'paired':>9}  95 % interval")
    for name, values in times.items():
        added = 1e3 * (statistics.median(values) - statistics.median(base))
        row = rows[name] = {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values)}
        if name == "baseline":
            print(f"{name:<16}{statistics.median(values) * 1e3:>10.2f}{min(values) * 1e3:>9.2f}")
            continue
        mid, low, high = paired_overhead(values, base)
        row.update(added_ms=added, paired_percent=mid, interval_percent=[low, high])
        print(f"{name:<16}{statistics.median(values) * 1e3:>10.2f}{min(values) * 1e3:>9.2f}{added:>+10.2f}"
              f"{mid:>+8.1f}%  [{low:+.1f} %, {high:+.1f} %]")
    return rows


if __name__ == "__main__":
    main()
