"""torchrun worker: per-rank traces in one directory, and what a rank short does to them.

    torchrun --nproc-per-node 2 tests/dist/traces.py OUT_DIR

- OUT_DIR/complete: both ranks trace a DDP run into one directory.
- OUT_DIR/missing:  only rank 0 traces (rank 1 never writes: as if killed before its first flush).
- OUT_DIR/killed:   both ranks trace; rank 1 is SIGKILLed in the middle of its third step, after
                    rank 0 closed its trace. Its first two steps were flushed (flush_every=1).

Each rank writes OUT_DIR/<run>.rank<r>.json with what its meter counted (for the killed rank: up to
its last closed step, written just before it dies). The launcher's exit status is non-zero
because rank 1 is killed; tests/test_distributed_traces.py reads the traces with the CLI.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flopcount  # noqa: E402


def record(out_dir: str, run: str, m) -> None:
    common.write_result(out_dir, run, dist.get_rank(), training_flops=m.training_flops,
                        hardware_flops=m.hardware_flops, steps=m.rollup.steps,
                        collective_calls=m.summary()["collective_calls"],
                        collective_bytes=m.summary()["collective_bytes"])


def complete(out_dir: str) -> None:
    model = torch.nn.parallel.DistributedDataParallel(common.make_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with flopcount.meter(os.path.join(out_dir, "complete"), backend="dispatch", warn=False) as m:
        common.train(model, optimizer, m, dist.get_rank())
    record(out_dir, "complete", m)


def missing(out_dir: str) -> None:
    if dist.get_rank() != 0:
        return
    model = common.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with flopcount.meter(os.path.join(out_dir, "missing"), backend="dispatch", warn=False) as m:
        common.train(model, optimizer, m, 0)
    record(out_dir, "missing", m)


def killed(out_dir: str) -> None:
    """No collectives inside the meter: rank 0 must finish while rank 1 is still alive."""
    rank = dist.get_rank()
    model = common.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with flopcount.meter(os.path.join(out_dir, "killed"), backend="dispatch", warn=False, flush_every=1) as m:
        common.train(model, optimizer, m, rank)
        if rank == 1:
            record(out_dir, "killed", m)
            dist.barrier()  # rank 0 has closed its trace
            x, _ = common.batch(rank, common.STEPS)
            model(x)  # a third step, never closed
            os.kill(os.getpid(), signal.SIGKILL)
    record(out_dir, "killed", m)
    dist.barrier()


def main() -> None:
    out_dir = common.out_dir_arg()
    dist.init_process_group("gloo")
    complete(out_dir)
    dist.barrier()
    missing(out_dir)
    dist.barrier()
    killed(out_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    common.exit_cleanly()
