"""Cost of module tracking per module call: a chain of N trivial modules (each one ``x * w``, a
scalar parameter), forward and backward, interleaved rounds, CPU time of the stepping thread
(one intra-op thread, so CPU backward runs on it too).

    python benchmarks/module_call_overhead.py [--modules 200] [--rounds 30] [--steps 20]

Variants: ``baseline`` (no meter; flopcount's process-wide module hooks, registered by the first
meter of the run and kept, are installed in every later variant and return at once without a meter), ``hook_floor`` (a second, do-nothing
global forward pre/post hook pair: what one more hook pair costs), ``native_untracked`` (native
backend, ``track_modules=False``), ``native`` (defaults), ``flopcountermode``. Prints per
variant the median step and the added µs per module call against the baseline and against
``native_untracked`` (module tracking alone), with the load average beside them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time

import torch


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.w


class Chain(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Scale() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@contextlib.contextmanager
def hook_floor():
    mod = torch.nn.modules.module
    pre = mod.register_module_forward_pre_hook(lambda m, a: None)
    post = mod.register_module_forward_hook(lambda m, a, o: None)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def metering(kind: str):
    import flopcount
    from torch.utils.flop_counter import FlopCounterMode

    if kind == "baseline":
        return contextlib.nullcontext()
    if kind == "hook_floor":
        return hook_floor()
    if kind == "flopcountermode":
        return FlopCounterMode(display=False)
    if kind == "native_untracked":
        return flopcount.meter(backend="native", warn=False, track_modules=False)
    return flopcount.meter(backend=kind, warn=False)


VARIANTS = ("baseline", "hook_floor", "native_untracked", "native", "flopcountermode")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", type=int, default=200)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(1)
    variants = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    model = Chain(args.modules)
    x = torch.ones(4, requires_grad=True)
    calls = args.modules + 1  # the chain itself is a module call too

    def step() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    def timed() -> float:
        start = time.thread_time()
        step()
        return time.thread_time() - start

    for _ in range(3):
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = random.Random(0)
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for kind in order.sample(variants, len(variants)):
            with metering(kind) as m:
                for _ in range(2):
                    step()
                    if kind.startswith("native"):
                        m.step()
                samples = []
                for _ in range(args.steps):
                    samples.append(timed())
                    if kind.startswith("native"):
                        m.step()  # explicit steps: no optimizer here; the close is not timed
                times[kind].append(statistics.median(samples))
    load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    base = med["baseline"]
    rows = {k: {"median_us": round(v, 1), "added_us_per_call": round((v - base) / calls, 2)} for k, v in med.items()}
    if "native" in med and "native_untracked" in med:
        rows["native"]["tracking_us_per_call"] = round((med["native"] - med["native_untracked"]) / calls, 2)
    out = {"modules": args.modules, "module_calls": calls, "rounds": args.rounds, "steps": args.steps,
           "clock": "thread CPU time, 1 intra-op thread", "load_average": [load_before, load_after],
           "variants": rows}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"chain of {args.modules} modules ({calls} module calls per step), {args.rounds} rounds x "
          f"{args.steps} steps, thread CPU time, load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'variant':<18}{'median µs':>11}{'added µs/call':>15}{'tracking µs/call':>18}")
    for k, r in rows.items():
        print(f"{k:<18}{r['median_us']:>11.1f}{r['added_us_per_call']:>15.2f}"
              f"{r.get('tracking_us_per_call', float('nan')):>18.2f}")


if __name__ == "__main__":
    main()
