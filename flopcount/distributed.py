"""Everything flopcount needs to know about a distributed job.

- Rank identity: from torch.distributed when initialised, else from the launcher's environment.
- Collectives: which ops are communication, and how many bytes each call moves. Collectives do
  no arithmetic (they are known-zero in the FLOP totals); their calls and bytes are recorded per
  step in separate columns.
- Job-wide totals: one small all-reduce of a rank's exact totals, on request.
"""
from __future__ import annotations

import socket

import torch

from .exact import from_limbs, to_limbs
from .formulas.registry import op_name
from .resources.rank import env_rank_and_world_size, job_id, local_rank


def rank_and_world_size() -> tuple[int, int]:
    """torch.distributed's answer when it is initialised, else the launcher's environment
    (resources/rank.py, the one table of launcher variables)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return env_rank_and_world_size()


def rank_identity() -> dict:
    """Who this process is in the job: rank, world_size, local_rank, host and the launcher's job id
    (None outside a launcher). Written with each rank's trace so that the summarizer can tell
    which ranks of which world it has."""
    rank, world_size = rank_and_world_size()
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank(),
            "host": socket.gethostname(), "job_id": job_id()}


# ---- collectives -----------------------------------------------------------------------------

# Namespaces of torch's communication ops (process-group ops, functional collectives, DTensor's).
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor")
# Ops in those namespaces that move no data: waiting on a handle, checks, autograd wrappers.
NOT_COMMUNICATION = frozenset({"wait_tensor", "check_for_nan", "_wrap_tensor_autograd"})


class Collective:
    """Counter entry for one communication op: which of its arguments are read and written."""

    __slots__ = ("arg_names",)

    def __init__(self, arg_names: tuple[str, ...]) -> None:
        self.arg_names = arg_names

    def payload_bytes(self, args, kwargs, out) -> int:
        """Bytes of the larger of the buffers sent and received (nccl-tests' "size"): the tensor
        for all-reduce and broadcast, the gathered output for all-gather, the full input for
        reduce-scatter."""
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        sent = received = 0
        for name, value in named.items():
            if name.startswith("input") or name in ("tensor", "tensors"):
                sent += _nbytes(value)
            if name.startswith("output") or name in ("out", "tensor", "tensors"):
                received += _nbytes(value)
        if not received:  # functional collectives return their result
            received = _nbytes(out)
        return max(sent, received)


def collective_entry(op) -> tuple[str, Collective] | None:
    """(name, Collective) for a communication op, None for any other op."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace not in COLLECTIVE_NAMESPACES:
        return None
    if op._opname in NOT_COMMUNICATION:
        return None
    return op_name(op), Collective(tuple(a.name for a in op._schema.arguments))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


# ---- job-wide totals -------------------------------------------------------------------------

TOTAL_KEYS = ("training_flops", "hardware_flops", "tokens", "samples", "steps",
              "collective_calls", "collective_bytes")
# Totals travel as base-2**32 limbs in int64 (flopcount/exact.py, the one exact-sum scheme):
# exact for any value below 2**128, and the sum of one limb over up to 2**31 ranks still fits in
# int64 (a single int64 overflows after a few hours of one GPU's FLOPs; float64 is not exact
# above 2**53).


def local_totals(totals) -> dict[str, int]:
    """This rank's exact totals over its closed steps (a meter's ``summary.LiveTotals``), as plain
    ints (None counts as 0)."""
    return {key: getattr(totals, key) or 0 for key in TOTAL_KEYS}


def all_reduce_totals(totals: dict[str, int], group=None) -> dict[str, int]:
    """Sum ``totals`` over the ranks of ``group`` with one all-reduce of 4 int64 per value; every
    rank of the group must call it at the same point. ``ranks`` says how many ranks took part."""
    dist = torch.distributed
    values = [int(totals[k]) for k in TOTAL_KEYS] + [1]
    if not (dist.is_available() and dist.is_initialized()):
        summed = values
    else:
        tensor = torch.tensor(to_limbs(values), dtype=torch.int64, device=_collective_device(group))
        dist.all_reduce(tensor, group=group)
        summed = from_limbs(tensor.tolist())
    out = dict(zip(TOTAL_KEYS, summed))
    out["ranks"] = summed[-1]
    return out


def _collective_device(group) -> torch.device:
    """CPU for gloo (and mixed gloo/nccl groups), the current accelerator otherwise."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "gloo" in backend or "cpu" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# ---- completeness of a multi-rank trace ------------------------------------------------------

from .trace.integrity import rank_integrity  # noqa: E402,F401  (moved to trace/: it needs no torch)
