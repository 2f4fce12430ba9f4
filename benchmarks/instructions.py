"""Instructions per step, counted by valgrind's callgrind: a noise-free companion to the timed
benchmarks. Instruction counts are not time (cache misses, atomics and branch misses weigh
differently), but they do not move with the load of a shared machine, so one run of each variant
answers "how much work does the meter add, and where" exactly and repeatably.

    python benchmarks/instructions.py [--model twin|chain|reference] [--steps 5]
        [--variants baseline,observer_floor,native_untracked,native] [--keep DIR]

Each variant runs in its own process under ``valgrind --tool=callgrind``: warm-up steps under an
open meter, then the counters are zeroed, ``--steps`` steps run, and the counters are dumped
(``callgrind_control``), so imports, model building and the meter's first steps are left out.
Prints per variant the instructions per step and the added share over the baseline; ``--keep``
keeps the profiles (``callgrind_annotate --inclusive=yes FILE`` shows where the work goes).
About 3-6 minutes per variant for the twin on this VM (the imports run under valgrind too).

Models: ``twin`` (reference_step.TWIN: the reference step's modules and op sequence with tiny
widths, AdamW), ``chain`` (module_call_overhead.Chain(50): 50 trivial modules, so module
tracking dominates), ``reference`` (the reference step itself: slow under valgrind).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("baseline", "observer_floor", "native_untracked", "native")


def _child(model: str, kind: str, steps: int) -> None:
    """Runs inside valgrind: warm up, zero the counters, run ``steps`` steps, dump."""
    import torch

    sys.path.insert(0, HERE)
    import reference_step as rs

    torch.set_num_threads(1)
    if model == "chain":
        import module_call_overhead as mco

        net, x = mco.Chain(50), torch.ones(4, requires_grad=True)

        def step() -> None:
            net(x).sum().backward()
            net.zero_grad(set_to_none=True)
            x.grad = None
    else:
        net, opt, ids = rs.build(twin=model == "twin")

        def step() -> None:
            rs.train_step(net, opt, ids)

    meter = contextlib.nullcontext() if kind == "baseline" else rs.metering(kind)
    explicit = model == "chain" and kind.startswith("native")  # no optimizer: steps by hand
    for _ in range(3):
        step()
    with meter as m:
        for _ in range(4):
            step()
            if explicit:
                m.step()
        pid = str(os.getpid())
        subprocess.run(["callgrind_control", "-z", pid], capture_output=True, check=False)
        for _ in range(steps):
            step()
            if explicit:
                m.step()
        subprocess.run(["callgrind_control", "-d", "timed", pid], capture_output=True, check=False)


def _count(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise RuntimeError(f"{path}: no summary line (did callgrind_control reach the process?)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("twin", "chain", "reference"), default="twin")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--keep", metavar="DIR", help="keep the callgrind profiles in DIR")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.steps)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("instructions.py: valgrind (with callgrind_control) is not installed; install valgrind")
    variants = ["baseline"] + [v for v in args.variants.split(",") if v and v != "baseline"]
    out = args.keep or tempfile.mkdtemp(prefix="flopcount-callgrind-")
    os.makedirs(out, exist_ok=True)
    per_step = {}
    for kind in variants:
        prefix = os.path.join(out, f"{args.model}.{kind}")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p", sys.executable,
               os.path.abspath(__file__), "--steps", str(args.steps), "--child", args.model, kind]
        subprocess.run(cmd, check=True, capture_output=True)
        dumps = [f for f in os.listdir(out) if re.fullmatch(rf"{re.escape(args.model)}\.{kind}\.\d+\.1", f)]
        if not dumps:
            sys.exit(f"instructions.py: no counter dump for {kind} in {out}")
        per_step[kind] = _count(os.path.join(out, sorted(dumps)[-1])) / args.steps
        print(f"{kind:<18}{per_step[kind] / 1e6:>10.2f} M instructions/step"
              f"{(per_step[kind] / per_step['baseline'] - 1) * 100:>+9.1f} %", flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
