"""How fast `flopcount plan` is: whole-process wall time and peak RSS of the CLI, median of runs.

    python benchmarks/plan_speed.py [--runs 3]

Cases: Llama-3.1-70B LoRA (r=16, q/v) at 8k context, and Llama-3.2-1B full fine-tune at 2k,
both from the shipped registry configs (offline). Each run is a fresh `python -m flopcount.cli
plan ... --json` process (imports included); peak RSS and CPU time (user + system) from
wait4's rusage of that process. CPU time is the load-independent figure on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "Llama-3.1-70B LoRA r=16, seq 8192": ["--config", "meta-llama/Llama-3.1-70B", "--seq-len", "8192",
                                          "--batch-size", "1", "--tokens", "1000000000", "--lora-rank", "16"],
    "Llama-3.2-1B full, seq 2048": ["--config", "meta-llama/Llama-3.2-1B", "--seq-len", "2048",
                                    "--batch-size", "8", "--tokens", "1000000000"],
}


def one_run(args) -> tuple[float, float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flopcount.cli", "plan", *args, "--json"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"plan failed: {proc.stderr.read().decode()[-2000:]}")
    # CPU seconds of the process: what it needs from one idle core, whatever the machine's load.
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss: KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for name, case in CASES.items():
        runs = [one_run(case) for _ in range(args.runs)]
        walls, rss, cpu = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
        print(f"{name}: wall median {statistics.median(walls):.1f} s (runs {', '.join(f'{w:.1f}' for w in walls)}), "
              f"CPU median {statistics.median(cpu):.1f} s, peak RSS median {statistics.median(rss):.0f} MiB (max {max(rss):.0f}); "
              f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
