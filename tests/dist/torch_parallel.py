"""torchrun worker: DDP, FSDP2, tensor parallel and FSDP2 + TP, each metered, one after another.

    torchrun --nproc-per-node 2 tests/dist/torch_parallel.py OUT_DIR ddp fsdp2 tp
    torchrun --nproc-per-node 4 tests/dist/torch_parallel.py OUT_DIR fsdp2_tp

Each check writes OUT_DIR/<check>.rank<r>.json with the rank's summary and the job-wide totals
from the meter's all-reduce; rank 0 also writes the single-process reference. The pytest wrapper
(tests/test_distributed.py) asserts the numbers.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import flopcount  # noqa: E402

# FSDP2 warns that the 2-D activations of Linear are views; nothing here edits them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module")


def tp_plan(model) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(model.blocks)):
        plan[f"blocks.{i}.up"] = ColwiseParallel()
        plan[f"blocks.{i}.down"] = RowwiseParallel()
    return plan


def build(check: str):
    """(model, data-parallel rank) for one parallelism."""
    from torch.distributed.device_mesh import init_device_mesh

    model = common.make_model()
    world = dist.get_world_size()
    if check == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), dist.get_rank()
    if check == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh), dist.get_rank()
    if check == "tp":
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        return parallelize_module(model, mesh, tp_plan(model)), 0  # every TP rank sees the same batch
    if check == "fsdp2_tp":
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan(model))
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"]), mesh["dp"].get_local_rank()
    raise SystemExit(f"unknown check {check!r}")


def run(check: str, backend: str, out_dir: str) -> None:
    model, dp_rank = build(check)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # sync_every=STEPS: one automatic all-reduce of the totals, after the last step.
    with flopcount.meter(backend=backend, warn=False, sync_every=common.STEPS) as m:
        common.train(model, optimizer, m, dp_rank)
    common.write_metered(out_dir, f"{check}-{backend}", dist.get_rank(), m, dp_rank=dp_rank)


def main() -> None:
    out_dir = common.out_dir_arg()
    dist.init_process_group("gloo")
    for backend in common.backends():
        if dist.get_rank() == 0:
            common.write_result(out_dir, f"reference-{backend}", 0,
                                summary=common.single_process_summary(backend))
        for check in sys.argv[2:]:
            run(check, backend, out_dir)
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    common.exit_cleanly()
