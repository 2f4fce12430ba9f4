"""Whole-process time of the analysis commands (`flopcount check DIR`, ...), start-up included.

Every round runs, in a shuffled order, `python -c pass` (the interpreter's floor) and each
command once per checkout being compared, as fresh processes; the result is the median over
rounds. A small trace (6 steps, 2 parts per table) is written first by a real metered loop, so the
figures are start-up plus a small read, which is what an auditor waits for.

    python benchmarks/cli_startup.py [--rounds 15] [--checkout NAME=PATH ...]

``--checkout NAME=PATH`` times the flopcount package found at PATH (a checkout or an exported
tree of another commit) beside this one, e.g. ``--checkout before=/tmp/flopcount-main``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
COMMANDS = {"check": ["check", "{dir}"], "verify": ["verify", "{dir}"], "summarize": ["summarize", "{dir}"],
            "models": ["models"]}


def write_trace(out: Path) -> None:
    code = ("import torch, flopcount\n"
            "layer = torch.nn.Linear(8, 6, bias=False); opt = torch.optim.SGD(layer.parameters(), lr=0.1)\n"
            f"with flopcount.meter(out={str(out)!r}, flush_every=3, backend='dispatch', base_model='Llama-3.2-1B') as m:\n"
            "    for _ in range(6):\n"
            "        layer(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad(); m.step()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(HERE)})


def timed(argv: list[str], env: dict, cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--commands", default="check,verify,summarize,models")
    args = parser.parse_args()
    checkouts = {"this": HERE, **{c.split("=", 1)[0]: Path(c.split("=", 1)[1]) for c in args.checkout}}
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "run"
        write_trace(trace)
        jobs = [("python -c pass", [sys.executable, "-c", "pass"], dict(os.environ))]
        for name, path in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(path)}
            for command in args.commands.split(","):
                argv = [a.format(dir=trace) for a in COMMANDS[command]]
                jobs.append((f"{name}: flopcount {command}", [sys.executable, "-m", "flopcount.cli", *argv], env))
        # cwd: the temp dir, so that `python -m` finds each checkout's package, not one in the cwd
        for _, argv, env in jobs:  # warm the file cache and __pycache__ once
            timed(argv, env, tmp)
        times: dict[str, list[float]] = {label: [] for label, _, _ in jobs}
        for _ in range(args.rounds):
            for label, argv, env in random.sample(jobs, len(jobs)):
                times[label].append(timed(argv, env, tmp))
    load = os.getloadavg()[0]
    print(f"{args.rounds} rounds, shuffled; load average {load:.1f} on {os.cpu_count()} CPUs; {sys.version.split()[0]}")
    print(f"{'process':<32} {'median s':>9} {'min s':>7} {'max s':>7}")
    for label, values in times.items():
        print(f"{label:<32} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
