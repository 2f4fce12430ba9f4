"""Rank identity: from torch.distributed when initialised, else from the launcher's environment."""
from __future__ import annotations

import os

import torch

# (rank, world size) variables set by torchrun / accelerate / deepspeed, SLURM and Open MPI.
_ENV_PAIRS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
              ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def rank_and_world_size() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, world_var in _ENV_PAIRS:
        rank, world = os.environ.get(rank_var), os.environ.get(world_var)
        if rank is not None and world is not None and rank.isdigit() and world.isdigit():
            return int(rank), int(world)
    return 0, 1
