"""Who this process is in a job, from the launcher's environment: the one place that knows the
variables of torchrun (and accelerate / deepspeed, which set the same), SLURM, Open MPI and
MPICH / Intel MPI. No torch here: ``flopcount.distributed`` adds torch.distributed's answer on
top, and the energy meter (which must not import torch to decide who reads the host's CPU
counters) asks ``local_rank()``.

Order matters: torchrun started by ``srun`` sees both ``LOCAL_RANK`` (its worker) and
``SLURM_LOCALID`` (the one srun task that ran torchrun), and the worker's own variable wins.
"""
from __future__ import annotations

import os

# (rank, world size) variables set by torchrun / accelerate / deepspeed, SLURM, Open MPI and MPICH.
ENV_PAIRS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
             ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))
# The rank on its host, same launchers in the same order.
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
# Launcher job ids: every rank of one job sees the same value.
JOB_ID_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")


def env_rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) from the first launcher whose pair of variables is set; (0, 1) alone."""
    for rank_var, world_var in ENV_PAIRS:
        rank, world = os.environ.get(rank_var), os.environ.get(world_var)
        if rank is not None and world is not None and rank.isdigit() and world.isdigit():
            return int(rank), int(world)
    return 0, 1


def local_rank() -> int | None:
    """This process's rank on its host; None outside a launcher."""
    value = next((os.environ[v] for v in LOCAL_RANK_VARS if os.environ.get(v, "").isdigit()), None)
    return None if value is None else int(value)


def job_id() -> str | None:
    """The launcher's job id (the same on every rank of one job); None outside a launcher."""
    return next((os.environ[v] for v in JOB_ID_VARS if os.environ.get(v)), None)
