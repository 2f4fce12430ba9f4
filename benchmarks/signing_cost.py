"""What Ed25519 signing adds to the trace writer: per signed manifest entry and per step.

Run: `python benchmarks/signing_cost.py` (about a minute). Not a timed test.

Method (the machine is shared, so whole steps are too noisy to show a cost this small):
- per entry: ``manifest.seal`` of a real part entry, unsigned / HMAC / Ed25519, 2,000 times each;
- per step: the real TraceWriter fed the real ``StepRecord`` of one metered reference CPU step
  (benchmarks/reference_step.py, 244 breakdown keys), 100 steps per round with flush_every=50
  and with flush_every=1 (one Parquet part pair + manifest rewrite + fsyncs per step), signing on
  and off, rounds interleaved; the thread CPU time of the writer (what signing adds is CPU) and its
  wall time (fsync included) per step, medians over rounds.
The figures are compared with a 280 ms reference step (its unloaded median on this machine).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REFERENCE_STEP_S = 0.280
ROUNDS, STEPS, SEALS = 7, 100, 2000


def reference_record():
    import torch

    import flopcount
    from reference_step import build, train_step

    torch.set_num_threads(2)
    model, optimizer, ids = build()
    with flopcount.meter(backend="dispatch", warn=False) as meter:
        train_step(model, optimizer, ids)
        meter.step(tokens=int(ids.numel()))
    return meter.last_step


def seal_cost(signer) -> dict:
    from flopcount.trace import manifest as mf

    entry = {"type": "part", "seq": 7, "segment": 0, "first_step": 350, "last_step": 399, "rows": 50,
             "written": time.time(), "t": time.time(),
             "steps": {"file": "steps/r00000-000007.parquet", "sha256": "ab" * 32, "bytes": 18000, "rows": 50},
             "breakdown": {"file": "breakdown/r00000-000007.parquet", "sha256": "cd" * 32, "bytes": 9000,
                           "rows": 300}}
    out = {}
    for name, key, sig in (("unsigned", None, None), ("hmac", b"secret", None), ("ed25519", None, signer)):
        started = time.thread_time()
        for _ in range(SEALS):
            mf.seal(entry, "0" * 64, key, sig)
        out[name] = (time.thread_time() - started) / SEALS
    return out


def writer_round(record, flush_every: int, signing_key) -> tuple[float, float]:
    import flopcount

    with tempfile.TemporaryDirectory() as root:
        meter = flopcount.Meter(os.path.join(root, "run"), flush_every=flush_every, signing_key=signing_key)
        meter.backend = "dispatch"
        writer = meter.open_writer()
        cpu, wall = time.thread_time(), time.perf_counter()
        for i in range(STEPS):
            record.step = i
            writer.write(record)
        writer.close({"training_flops": 0, "hardware_flops": 0})
        return (time.thread_time() - cpu) / STEPS, (time.perf_counter() - wall) / STEPS


def main() -> None:
    from flopcount.trace import keys

    keydir = tempfile.mkdtemp()
    private, _, key_id = keys.new_keys(os.path.join(keydir, "k"))
    seals = seal_cost(keys.load_signer(private))
    record = reference_record()
    results: dict = {}
    for _ in range(ROUNDS):
        for flush_every in (50, 1):
            for name, key in (("off", None), ("ed25519", private)):
                results.setdefault((flush_every, name), []).append(writer_round(record, flush_every, key))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{len(record.flops)} breakdown keys per step; key {key_id}")
    for name, cost in seals.items():
        print(f"seal one entry, {name:8s}: {cost * 1e6:7.1f} us CPU")
    for (flush_every, name), runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        print(f"flush_every={flush_every:<3d} signing {name:8s}: {cpu * 1e3:6.3f} ms CPU/step "
              f"({cpu / REFERENCE_STEP_S:.3%} of a 280 ms step), {wall * 1e3:6.3f} ms wall/step")
    for flush_every in (50, 1):
        added = (statistics.median(r[0] for r in results[(flush_every, "ed25519")])
                 - statistics.median(r[0] for r in results[(flush_every, "off")]))
        print(f"signing adds {added * 1e6:+.0f} us CPU/step at flush_every={flush_every} "
              f"({added / REFERENCE_STEP_S:+.4%} of a 280 ms step)")


if __name__ == "__main__":
    main()
