"""DeepSpeed ZeRO stages 1-3 with the real launcher (`deepspeed --num_gpus 2`, DS_ACCELERATOR=cpu,
gloo). Each rank runs its own batch: the ranks' matmul FLOPs add up to 2 x the single-process
count of the same model and batches, which equals the closed form; ZeRO-3's parameter
all-gathers and gradient reduce-scatters are recorded as collectives, never as FLOPs."""
from __future__ import annotations

import socket
import sys

import pytest

from test_distributed import (DIST, check_ranks, closed_form_matmul, common, last_step_collectives, launch,
                              matmul_by_phase, param_bytes, results)

pytest.importorskip("deepspeed")

STAGES = ("1", "2", "3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(DIST / "deepspeed_zero.py"), str(out), *STAGES]
    proc = launch(cmd, out, timeout=400, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_counts_each_rank_once(zero_runs, stage):
    backends = sorted(p.name[len("reference-"):-len(".rank0.json")] for p in zero_runs.glob("reference-*.rank0.json"))
    assert "dispatch" in backends
    for backend in backends:
        reference = results(zero_runs, f"reference-{backend}", 1)[0]["summary"]
        ranks = results(zero_runs, f"zero{stage}-{backend}", 2)
        check_ranks(ranks, reference, dp_degree=2, world=2)
        for r in ranks:
            assert matmul_by_phase(r["summary"]) == closed_form_matmul()
            step = last_step_collectives(r)
            if stage == "3":
                # Parameters are gathered before use; gradients are reduce-scattered once
                # (every dim splits evenly over the 2 ranks).
                assert step["c10d._reduce_scatter_base_"][1] == param_bytes()
                assert step["c10d._allgather_base_"][1] >= param_bytes()
            else:
                # Stages 1-2: gradients all-reduced, updated partitions all-gathered.
                assert step["c10d._allgather_base_"][1] == param_bytes()
                assert step["c10d.allreduce_"][1] >= param_bytes()


def test_deepspeed_opaque_names():
    """Fused optimizers and DeepSpeed's fused transformer modules are recognised by class; the
    optimizers are counted at step() (tests/test_deepspeed_optimizers.py), the modules reported
    uncounted per forward."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    from flopcount.integrations.deepspeed import OPAQUE_OPTIMIZER_PACKAGES, opaque_name

    from deepspeed.ops.transformer import DeepSpeedTransformerLayer

    from flopcount.integrations.deepspeed import OPAQUE_MODULE_PACKAGES

    for cls in (DeepSpeedCPUAdam, FusedAdam):  # instances without building their extensions
        name = opaque_name(object.__new__(cls), OPAQUE_OPTIMIZER_PACKAGES, "step")
        assert name == f"{cls.__module__}.{cls.__qualname__}.step"
    layer = object.__new__(DeepSpeedTransformerLayer)  # its CUDA kernels: reported per forward
    assert opaque_name(layer, OPAQUE_MODULE_PACKAGES, "forward") == \
        "deepspeed.ops.transformer.transformer.DeepSpeedTransformerLayer.forward"
    import torch

    assert opaque_name(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), OPAQUE_OPTIMIZER_PACKAGES,
                       "step") is None
