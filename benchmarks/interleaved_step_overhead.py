"""Interleaved whole-step overhead on the reference CPU step: each round runs every variant, so
slow drifts of the machine (frequency, neighbours) hit all variants alike, and each variant's
step is compared with the baseline step of the same round (paired); the order within a round is
shuffled. Prints per variant the
median and minimum step time, the median paired overhead with a bootstrap 95 % interval, and
the added milliseconds.

    python benchmarks/interleaved_step_overhead.py [--rounds 40] [--threads 2]
        [--variants baseline,flopcountermode,dispatch,native,observer_floor] [--malloc steady|default]
        [--clock wall|thread] [--twin] [--steps 3]

Each variant runs under a fresh meter per round. Its first step is not timed; its second is timed
on its own and reported separately, because it closes the meter's first step, which evaluates the
formula of every distinct key once (about 360 keys, 4-8 ms on the reference step, once per
meter); the steady-state figure is the median of the next ``--steps`` steps (3; twin 20), what
every later step of a job pays.

``--twin`` runs the reference step's tiny twin (reference_step.TWIN: same modules and op
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
import random
import statistics
import time

import torch
from reference_step import build, metering, train_step

VARIANTS = ("baseline", "flopcountermode", "dispatch", "native")
EXTRA_VARIANTS = ("native_untracked", "observer_floor")  # ablations, run only when named (reference_step.metering)
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
    p.add_argument("--twin", action="store_true", help="the tiny twin of the reference step")
    p.add_argument("--steps", type=int, default=0,
                   help="steady-state steps timed per variant and round (median taken); default 3, twin 20")
    args = p.parse_args()
    variants = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    unknown = set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        p.error(f"unknown variant(s): {', '.join(sorted(unknown))}; "
                f"choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    steady = args.malloc == "steady" and steady_malloc()
    torch.set_num_threads(args.threads)
    model, optimizer, ids = build(twin=args.twin)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    timed_steps = args.steps or (20 if args.twin else 3)
    for _ in range(3):
        train_step(model, optimizer, ids)
    times: dict[str, list[float]] = {kind: [] for kind in variants}  # steady state
    first: dict[str, list[float]] = {kind: [] for kind in variants}  # second step (the first booking)
    order = random.Random(0)

    def timed() -> float:
        start = clock()
        train_step(model, optimizer, ids)
        return clock() - start

    for _ in range(args.rounds):
        for kind in order.sample(variants, len(variants)):  # no variant always runs next to the baseline
            with metering(kind):
                train_step(model, optimizer, ids)  # the meter's first step: hooks and keys appear
                first[kind].append(timed())  # closes the first step: every distinct key is booked once
                times[kind].append(statistics.median(timed() for _ in range(timed_steps)))
    print(f"{'twin of the ' if args.twin else ''}reference step: {args.rounds} rounds, {args.threads} threads, "
          f"{args.clock} clock, malloc {'steady' if steady else 'default'}")
    print(f"steady state (median of steps 3-{timed_steps + 2} under a fresh meter: what each step of a job pays)")
    report(times)
    print("second step under a fresh meter (it books the first step's distinct keys: once per meter)")
    report(first)


def report(times: dict[str, list[float]]) -> None:
    base = times["baseline"]
    print(f"{'variant':<16}{'median ms':>10}{'min ms':>9}{'added ms':>10}{'paired':>9}  95 % interval")
    for name, values in times.items():
        added = 1e3 * (statistics.median(values) - statistics.median(base))
        if name == "baseline":
            print(f"{name:<16}{statistics.median(values) * 1e3:>10.2f}{min(values) * 1e3:>9.2f}")
            continue
        mid, low, high = paired_overhead(values, base)
        print(f"{name:<16}{statistics.median(values) * 1e3:>10.2f}{min(values) * 1e3:>9.2f}{added:>+10.2f}"
              f"{mid:>+8.1f}%  [{low:+.1f} %, {high:+.1f} %]")


if __name__ == "__main__":
    main()
