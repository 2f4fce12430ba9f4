"""flopcount.resources: one source for rank and local rank (SLURM and Open MPI without torchrun:
only local rank 0 reads the host's RAPL counters, so summing ranks counts the CPU energy once),
and trailing rows, which are not steps, give no per-step FLOP/s sample."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flopcount
from flopcount import resources
from test_energy import fill
from test_energy_meter import advance, make_rapl
from test_no_torch import BLOCKED

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK",
                 "PMI_SIZE", "MPI_LOCALRANKID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")
# (rank, world size, local rank) variables of each launcher, as srun / mpirun set them without torchrun.
LAUNCHERS = {"srun": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
             "mpirun": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")}
STEPS = 3
PACKAGE_J = [1.0, 2.0, 4.0]  # the host's package energy during each step of each rank


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def as_rank(monkeypatch, launcher: str, rank: int, world: int = 2) -> None:
    rank_var, world_var, local_var = LAUNCHERS[launcher]
    monkeypatch.setenv(rank_var, str(rank))
    monkeypatch.setenv(world_var, str(world))
    monkeypatch.setenv(local_var, str(rank))  # both ranks on one host


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_only_local_rank_zero_samples_the_hosts_cpu_counters(launcher, no_launcher, tmp_path):
    """Two ranks of one host under srun / mpirun (no torchrun, no LOCAL_RANK) meter into one trace
    dir while the host's package counter advances: the CPU energy is in rank 0's rows only, and
    the summed total is the host's energy once."""
    package, _ = make_rapl(tmp_path / "powercap")
    no_launcher.setenv("FLOPCOUNT_RAPL_ROOT", str(tmp_path / "powercap"))
    out = tmp_path / "run"
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for rank in (0, 1):
        as_rank(no_launcher, launcher, rank)
        assert resources.local_rank() == rank and resources.env_rank_and_world_size() == (rank, 2)
        with flopcount.meter(out=out, backend="dispatch", run_id="job", warn=False) as m:
            for joules in PACKAGE_J:
                layer(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
                advance(package, joules)
                m.step()
        assert (m.energy.cpu is None) == (rank == 1)
    frame = flopcount.read_trace(out).sort_values(["rank", "step"])
    assert frame["rank"].tolist() == [0] * STEPS + [1] * STEPS
    assert frame.cpu_energy_source.tolist() == [resources.RAPL] * STEPS + [resources.RAPL_OTHER_RANK] * STEPS
    assert frame.cpu_energy_j.iloc[:STEPS].tolist() == pytest.approx(PACKAGE_J)
    assert frame.cpu_energy_j.iloc[STEPS:].isna().all()
    energy = flopcount.summarize(out)["energy"]
    assert energy["cpu_j"] == pytest.approx(sum(PACKAGE_J))  # rank 0's figure: the host's energy while it ran
    assert energy["cpu_sources"] == {resources.RAPL: STEPS, resources.RAPL_OTHER_RANK: STEPS}
    assert energy["complete"] is True and energy["cpu_rows_missing"] == 0


def test_the_workers_local_rank_wins_over_the_launcher_that_started_torchrun(no_launcher, tmp_path):
    """torchrun started by srun: SLURM_LOCALID is the srun task (0 for every worker), LOCAL_RANK the
    worker; the worker's variable decides who reads the host's counters."""
    make_rapl(tmp_path)
    no_launcher.setenv("SLURM_LOCALID", "0")
    no_launcher.setenv("LOCAL_RANK", "1")
    assert resources.local_rank() == 1
    assert resources.open_energy_meter(2, rapl_root=str(tmp_path)).cpu is None
    no_launcher.setenv("LOCAL_RANK", "0")
    no_launcher.setenv("SLURM_LOCALID", "3")
    assert resources.open_energy_meter(2, rapl_root=str(tmp_path)).cpu.source == resources.RAPL
    no_launcher.delenv("LOCAL_RANK")
    no_launcher.delenv("SLURM_LOCALID")
    no_launcher.setenv("MPI_LOCALRANKID", "2")  # MPICH / Intel MPI
    assert resources.local_rank() == 2 and resources.open_energy_meter(2, rapl_root=str(tmp_path)).cpu is None
    no_launcher.delenv("MPI_LOCALRANKID")
    assert resources.local_rank() is None  # a single process: it reads its host's counters
    assert resources.open_energy_meter(1, rapl_root=str(tmp_path)).cpu.source == resources.RAPL


# ---- trailing rows are not steps --------------------------------------------------------------

def tally_row(**values) -> dict:
    row = dict(run_id="a", rank=0, device_name="cpu x", device_count=2, gpu_energy_j=None,
               gpu_energy_source=resources.NO_DEVICE, gpu_energy_devices=0, cpu_energy_j=1.0,
               cpu_energy_source=resources.RAPL, trailing=False)
    row.update(values)
    return row


@pytest.mark.parametrize("vectorised", [False, True], ids=["per-row", "batch"])
def test_trailing_rows_count_in_time_and_energy_but_give_no_step_rate(vectorised):
    rows = [tally_row(start_time=0.0, end_time=10.0, training_flops=400),
            tally_row(start_time=10.0, end_time=20.0, training_flops=800),
            tally_row(start_time=20.0, end_time=24.0, training_flops=0, trailing=True)]  # a final evaluation
    tally = fill(resources.ResourceTally(), rows, vectorised)
    assert sorted(tally.step_rates["cpu x"]) == pytest.approx([400 / (2 * 10.0), 800 / (2 * 10.0)])
    assert tally.device_seconds["cpu x"] == pytest.approx(2 * 24.0)  # the evaluation used the devices
    assert tally.energy_summary()["cpu_j"] == pytest.approx(3.0) and tally.rows == 3


def test_step_rates_of_a_run_with_a_final_evaluation(tmp_path):
    layer = torch.nn.Linear(8, 6, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with flopcount.meter(out=tmp_path / "run", backend="dispatch", energy=False, warn=False) as m:
        for _ in range(STEPS):
            layer(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            layer(torch.randn(4, 8))  # after the last optimizer step: a trailing record
    for summary in (m.summary(), flopcount.summarize(tmp_path / "run")):
        assert summary["steps"] == STEPS and summary["trailing_flops"] == 2 * 4 * 8 * 6
        (rates,) = summary["hardware_estimate"]["step_rates"].values()
        assert rates["steps"] == STEPS and rates["min"] > 0


def test_the_resources_package_imports_no_torch():
    modules = ["flopcount.energy", "flopcount.resources", "flopcount.resources.rank", "flopcount.resources.counters",
               "flopcount.resources.devices", "flopcount.resources.sampler", "flopcount.resources.rows",
               "flopcount.resources.tally", "flopcount.resources.prose"]
    code = BLOCKED.split("from flopcount.cli")[0] + "".join(f"import {m}\n" for m in modules) + (
        "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
