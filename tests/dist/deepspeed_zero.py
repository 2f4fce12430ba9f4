"""DeepSpeed worker: ZeRO stages, each metered, one after another (CPU accelerator, gloo).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/deepspeed_zero.py OUT_DIR 1 2 3

Each stage writes OUT_DIR/zero<stage>.rank<r>.json; rank 0 also writes the single-process
reference. The pytest wrapper (tests/test_distributed_deepspeed.py) asserts the numbers.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flopcount  # noqa: E402


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": common.BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        # A torch optimizer (its aten ops are counted); DeepSpeed's own fused optimizers run in
        # C++ extensions that no dispatch mode sees: see docs/scale.md.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def run(stage: int, backend: str, out_dir: str) -> None:
    import deepspeed

    model = common.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    rank = torch.distributed.get_rank()
    with flopcount.meter(backend=backend, warn=False, sync_every=common.STEPS) as m:
        for step in range(common.STEPS):
            x, y = common.batch(rank, step)
            loss = common.loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
            m.step(tokens=common.BATCH * common.SEQ, samples=common.BATCH)
    common.write_metered(out_dir, f"zero{stage}-{backend}", rank, m, dp_rank=rank,
                         optimizer=type(engine.optimizer).__name__)
    engine.destroy()


def main() -> None:
    import importlib

    import deepspeed

    # The deepspeed launcher adds --local_rank=N; the rank comes from the environment.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    out_dir = common.out_dir_arg()
    # Skip JIT-compiling DeepSpeed's shared-memory all-reduce kernel (minutes on 2 cores; used
    # only by inference_all_reduce): training collectives go through torch.distributed / gloo.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    for backend in common.backends():
        if torch.distributed.get_rank() == 0:
            common.write_result(out_dir, f"reference-{backend}", 0,
                                summary=common.single_process_summary(backend))
        for stage in sys.argv[2:]:
            run(int(stage), backend, out_dir)
            torch.distributed.barrier()


if __name__ == "__main__":
    main()
    common.exit_cleanly()
