"""Distributed pieces that need no launcher: rank identity from the environment, exact job-wide
totals (the all-reduce payload), collectives' calls and bytes in a one-rank gloo group, and the
completeness check of a trace dir's ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flopcount
from flopcount.capture import native
from flopcount.distributed import (from_limbs, rank_and_world_size, rank_identity, rank_integrity,
                                   to_limbs)

BACKENDS = ["dispatch"] + (["native"] if native.load() is not None else [])


def test_rank_identity_from_the_launchers_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    assert rank_and_world_size() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    identity = rank_identity()
    assert (identity["rank"], identity["world_size"], identity["local_rank"], identity["job_id"]) == (5, 8, 1, "4242")
    monkeypatch.setenv("RANK", "3")  # torchrun's variables come first
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world_size() == (3, 4)


def test_job_totals_are_exact_beyond_int64():
    """The all-reduce sums 32-bit limbs in int64: exact for totals far above 2**63 and float64's 2**53."""
    per_rank = [[2**64 + 12345, 3 * 10**22 + 7], [2**63 - 1, 10**24 + 1], [0, 2**100 + 3]]
    summed_limbs = [sum(col) for col in zip(*(to_limbs(v) for v in per_rank))]
    assert all(limb < 2**63 for limb in summed_limbs)
    assert from_limbs(summed_limbs) == [sum(col) for col in zip(*per_rank)]
    with pytest.raises(ValueError):
        to_limbs([-1])


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:.*all_gather_into_tensor.* is deprecated:FutureWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_collectives_are_zero_flop_but_counted_with_bytes(one_rank_group, backend):
    from torch.distributed import _functional_collectives as funcol

    x = torch.ones(10, 6)  # 240 bytes of float32
    with flopcount.meter(backend=backend, warn=False) as m:
        y = x * 2  # 60 FLOP of real work
        dist.all_reduce(y)
        gathered = torch.empty(10, 6)
        dist.all_gather_into_tensor(gathered, y)
        funcol.all_reduce(y, "sum", dist.group.WORLD).wait()
        totals = m.global_totals()  # the meter's own all-reduce: not the job's communication
        m.step()
    s = m.summary()
    assert s["collectives"] == {"c10d.allreduce_": {"calls": 1, "bytes": 240},
                                "c10d._allgather_base_": {"calls": 1, "bytes": 240},
                                "_c10d_functional.all_reduce": {"calls": 1, "bytes": 240}}
    assert (s["collective_calls"], s["collective_bytes"]) == (3, 720)
    assert s["hardware_flops"] == 60
    assert m.last_step.collectives == {op: v["calls"] for op, v in s["collectives"].items()}
    assert totals["ranks"] == 1 and totals["hardware_flops"] == 0  # no step had closed yet
    after = m.global_totals()
    assert (after["hardware_flops"], after["collective_calls"], after["steps"]) == (60, 3, 1)


def test_sync_every_keeps_job_totals(one_rank_group):
    with flopcount.meter(backend="dispatch", warn=False, sync_every=2) as m:
        for i in range(3):
            torch.ones(4) * 2
            m.step()
            assert (m.job_totals or {}).get("steps") == (2 if i >= 1 else None)
    assert m.job_totals["hardware_flops"] == 8
    with pytest.raises(ValueError, match="sync_every"):
        flopcount.meter(sync_every=0)


def _segment(rank, segment=0, world=4, first_step=0):
    return {"type": "segment", "rank": rank, "world_size": world, "segment": segment, "first_step": first_step}


def _part(segment, first, last):
    return {"type": "part", "segment": segment, "first_step": first, "last_step": last}


def test_rank_integrity_names_missing_and_unclosed_ranks():
    manifests = {
        "manifest/r00000.jsonl": [_segment(0), {"type": "close", "segment": 0}],
        # resumed: the first segment was killed after flushing steps 0-7, the second closed
        "manifest/r00001.jsonl": [_segment(1), _part(0, 0, 7), _segment(1, 1, first_step=8),
                                  {"type": "close", "segment": 1}],
        "manifest/r00003.jsonl": [_segment(3), _part(0, 0, 4)],  # killed after a flush
    }
    found = rank_integrity(manifests, "ft-1")
    assert found["missing_ranks"] == [2] and found["unfinished_ranks"] == [1, 3]
    assert found["rank_problems"] == [
        "ft-1: rank 2 of 4 is missing (no trace written)",
        "ft-1: rank 1 of 4: segment 0 has no close (killed, then resumed): the steps after its last flush "
        "(step 7) were lost (segment 0 of manifest/r00001.jsonl)",
        "ft-1: rank 3 of 4 did not close its trace (killed or still running): steps after its last "
        "flush are not counted (segment 0 of manifest/r00003.jsonl; after its last flush (step 4))"]
    complete = {f"m{r}": [_segment(r, world=2), {"type": "close", "segment": 0}] for r in range(2)}
    assert rank_integrity(complete)["rank_problems"] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensor_shape_propagation_is_not_counted(backend):
    """DTensor propagates shardings by running ops on fake tensors (global shapes, no compute):
    the meter lets them run and counts nothing for them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with flopcount.meter(backend=backend, warn=False) as m:
        with FakeTensorMode():
            torch.empty(64, 32) @ torch.empty(32, 16)
        torch.ones(4, 8) @ torch.ones(8, 2)
        m.step()
    assert m.summary()["by_category"]["matmul"] == 2 * 4 * 8 * 2
