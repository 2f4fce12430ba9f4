"""Helpers for the trace, summary, CLI and report tests: small real metered runs and closed forms."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import torch

import flopcount

BATCH, IN, OUT = 4, 8, 6
TOKENS_PER_SAMPLE = 3
# One training step of Linear(IN, OUT, bias=False) on an input without grad: the forward product
# and the weight-gradient product, 2*B*IN*OUT each (one multiply-add = 2 FLOP).
MATMUL_PER_STEP = 2 * (2 * BATCH * IN * OUT)


def train(out, steps: int, *, flush_every: int = 50, eval_every: int = 0, **options) -> flopcount.Meter:
    """A real metered run of a bias-free linear layer with SGD; returns the (closed) meter."""
    options.setdefault("backend", "dispatch")  # these tests are about traces, not capture backends
    torch.manual_seed(0)
    layer = torch.nn.Linear(IN, OUT, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=out, flush_every=flush_every, **options) as meter:
        for step in range(steps):
            if eval_every and step % eval_every == 0:
                with torch.no_grad(), meter.evaluating():  # held-out evaluation inside a training step
                    layer(torch.randn(BATCH, IN))
            layer(torch.randn(BATCH, IN)).sum().backward()
            opt.step()
            opt.zero_grad()
            meter.step(tokens=BATCH * TOKENS_PER_SAMPLE, samples=BATCH)
    return meter


def tree_digest(root) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (to show that reading modifies nothing)."""
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Run the real `flopcount` console script (from this venv) in a subprocess."""
    script = os.path.join(os.path.dirname(sys.executable), "flopcount")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "flopcount.cli"]
    command += [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def reseal(run) -> None:
    """Recompute every listed part's SHA-256 and size and the unkeyed hash chain of every manifest,
    as anyone can without a key: rewritten parts then verify, so what a reader makes of their
    content is tested on its own (bad input, exit 2) rather than as an integrity finding."""
    import json
    from pathlib import Path

    from flopcount.trace import manifest as mf

    run = Path(run)
    for path in sorted((run / "manifest").glob("*.jsonl")):
        prev, sealed = mf.GENESIS, []
        for entry in (json.loads(line) for line in path.read_text().splitlines() if line.strip()):
            for value in entry.values():
                if isinstance(value, dict) and "file" in value and "sha256" in value:
                    data = (run / value["file"]).read_bytes()
                    value["sha256"] = hashlib.sha256(data).hexdigest()
                    if "bytes" in value:
                        value["bytes"] = len(data)
            entry = mf.seal({k: v for k, v in entry.items() if k not in ("hash", "hmac", "prev")}, prev, None)
            sealed.append(entry)
            prev = entry["hash"]
        path.write_bytes(mf.dumps(sealed))
