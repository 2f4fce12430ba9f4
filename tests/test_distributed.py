"""Distributed runs with the real launcher (torchrun, gloo, CPU): DDP, FSDP2, tensor parallel and
FSDP2 + TP on a 2-D mesh. Every rank counts its own work; the sum over ranks equals the
single-process count of the same model and batches (TP) or data-parallel degree x that count
(DDP, FSDP2), and both equal a closed form computed here from the model's sizes.

One launch runs several checks (the workers are tests/dist/*.py; each rank writes a JSON file
per check, asserted here).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST = Path(__file__).parent / "dist"
_spec = importlib.util.spec_from_file_location("flopcount_dist_common", DIST / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

TOKENS = common.BATCH * common.SEQ  # rows through every Linear per step
GEMM_CATEGORIES = ("matmul", "attention", "conv")


# ---- closed forms ---------------------------------------------------------------------------------

def closed_form_matmul() -> dict[str, int]:
    """Matmul FLOPs of STEPS single-process steps: forward 2·N·in·out per Linear; backward the
    weight gradient of every Linear plus the input gradient of every Linear but the first (the
    batch needs no gradient)."""
    dims = common.layer_dims()
    forward = sum(2 * TOKENS * i * o for i, o in dims)
    backward = forward + sum(2 * TOKENS * i * o for i, o in dims[1:])
    return {"forward": common.STEPS * forward, "backward": common.STEPS * backward}


def param_bytes() -> int:
    """float32 bytes of all weights and biases: what one step's gradient reduction moves."""
    return 4 * sum(i * o + o for i, o in common.layer_dims())


# ---- launching ------------------------------------------------------------------------------------

def launch(cmd: list[str], tmp: Path, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(cmd, cwd=tmp, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(DIST / script), *args]


def results(out: Path, name: str, world: int) -> list[dict]:
    files = [out / f"{name}.rank{r}.json" for r in range(world)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result: {missing}"
    return [json.loads(f.read_text()) for f in files]


def matmul_by_phase(summary: dict) -> dict[str, int]:
    return {phase: sum(cats.get(c, 0) for c in GEMM_CATEGORIES)
            for phase, cats in summary["by_phase_category"].items()
            if any(cats.get(c, 0) for c in GEMM_CATEGORIES)}


def summed(ranks: list[dict], key) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in ranks:
        for k, v in key(r["summary"]).items():
            total[k] = total.get(k, 0) + v
    return total


def check_job_totals(ranks: list[dict], world: int) -> None:
    """The meter's all-reduce (sync_every and on request) equals the sum of the ranks' summaries,
    and its own all-reduce is not booked as the job's communication."""
    expected = {
        "training_flops": sum(r["summary"]["training_flops"] for r in ranks),
        "hardware_flops": sum(r["summary"]["hardware_flops"] for r in ranks),
        "collective_calls": sum(r["summary"]["collective_calls"] for r in ranks),
        "collective_bytes": sum(r["summary"]["collective_bytes"] for r in ranks),
        "steps": world * common.STEPS, "tokens": world * common.STEPS * TOKENS,
        "samples": world * common.STEPS * common.BATCH, "ranks": world,
    }
    for r in ranks:
        assert r["auto_totals"] == expected
        assert r["on_request"] == expected


def check_ranks(ranks: list[dict], reference: dict, dp_degree: int, world: int) -> None:
    assert sorted({r["summary"]["rank"] for r in ranks}) == list(range(world))
    assert all(r["summary"]["world_size"] == world for r in ranks)
    assert all(r["summary"]["uncounted_ops"] == {} for r in ranks), [r["summary"]["uncounted_ops"] for r in ranks]
    single = closed_form_matmul()
    assert matmul_by_phase(reference) == single
    assert summed(ranks, matmul_by_phase) == {p: dp_degree * f for p, f in single.items()}
    check_job_totals(ranks, world)


def last_step_collectives(rank: dict) -> dict[str, tuple[int, int]]:
    step = rank["last_step"]
    return {op: (n, step["collective_bytes"][op]) for op, n in step["collectives"].items()}


# ---- torchrun: DDP, FSDP2, TP (2 ranks) and FSDP2 + TP (4 ranks) ---------------------------------

@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    proc = launch(torchrun(2, "torch_parallel.py", str(out), "ddp", "fsdp2", "tp"), out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def backends(out: Path) -> list[str]:
    found = sorted(p.name[len("reference-"):-len(".rank0.json")] for p in out.glob("reference-*.rank0.json"))
    assert "dispatch" in found
    return found


def test_ddp_counts_each_rank_once(torch_runs):
    for backend in backends(torch_runs):
        reference = results(torch_runs, f"reference-{backend}", 1)[0]["summary"]
        ranks = results(torch_runs, f"ddp-{backend}", 2)
        check_ranks(ranks, reference, dp_degree=2, world=2)
        # One gradient all-reduce per step moves every gradient once (one bucket here).
        for r in ranks:
            assert last_step_collectives(r)["c10d.allreduce_"] == (1, param_bytes())
            assert r["summary"]["collectives"]["c10d.allreduce_"]["calls"] == common.STEPS


def test_fsdp2_counts_local_work(torch_runs):
    for backend in backends(torch_runs):
        reference = results(torch_runs, f"reference-{backend}", 1)[0]["summary"]
        ranks = results(torch_runs, f"fsdp2-{backend}", 2)
        check_ranks(ranks, reference, dp_degree=2, world=2)
        for r in ranks:
            step = last_step_collectives(r)
            # The gradients' reduce-scatter takes every full gradient once (dims split evenly).
            assert step["c10d._reduce_scatter_base_"][1] == param_bytes()
            # All-gathers rebuild the full parameters for forward (and again for backward).
            assert step["c10d._allgather_base_"][1] >= param_bytes()


def test_tensor_parallel_sums_to_the_single_process_count(torch_runs):
    """DTensor's local shard ops are counted, never the wrapper op with global shapes:
    the ranks together did the single process's matmul work exactly once."""
    for backend in backends(torch_runs):
        reference = results(torch_runs, f"reference-{backend}", 1)[0]["summary"]
        ranks = results(torch_runs, f"tp-{backend}", 2)
        check_ranks(ranks, reference, dp_degree=1, world=2)
        single = closed_form_matmul()
        for r in ranks:  # column/row sharding halves every GEMM on each rank
            assert matmul_by_phase(r["summary"]) == {p: f // 2 for p, f in single.items()}
            # Megatron-style collectives: per block one all-reduce of the row-parallel output in
            # forward; in backward one of the input gradient of each column-parallel layer whose
            # input needs a gradient (blocks.1.up and head, not blocks.0.up); one all-gather of
            # the replicated logits.
            activation = 4 * TOKENS * common.DIM
            assert last_step_collectives(r) == {
                "_c10d_functional.all_reduce": (2 * common.BLOCKS, 2 * common.BLOCKS * activation),
                "_c10d_functional.all_gather_into_tensor": (1, 4 * TOKENS * common.CLASSES)}


def test_fsdp2_with_tensor_parallel_on_a_2d_mesh(tmp_path):
    proc = launch(torchrun(4, "torch_parallel.py", str(tmp_path), "fsdp2_tp"), tmp_path,
                  env={"FLOPCOUNT_DIST_BACKENDS": "dispatch"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reference = results(tmp_path, "reference-dispatch", 1)[0]["summary"]
    ranks = results(tmp_path, "fsdp2_tp-dispatch", 4)
    assert sorted(r["dp_rank"] for r in ranks) == [0, 0, 1, 1]
    check_ranks(ranks, reference, dp_degree=2, world=4)
