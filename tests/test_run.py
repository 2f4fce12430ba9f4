"""`flopcount run -- COMMAND`: real subprocesses metering unmodified scripts (tests/integration_scripts).

Every script trains Linear 16 -> 32 -> 4 (with bias) on batches of 8 for 3 SGD steps per process.
Matmul FLOPs per step and process, in closed form: forward 2*8*(16*32 + 32*4); backward both
weight gradients (the same again) plus the second Linear's input gradient, 2*8*32*4 (the data
needs no gradient). The plain script then runs one no-grad forward: phase eval.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import flopcount
from flopcount.trace.reader import read_table

SCRIPTS = Path(__file__).parent / "integration_scripts"
BIN = Path(sys.executable).parent
STEPS, BATCH = 3, 8
FORWARD = 2 * BATCH * (16 * 32 + 32 * 4)
BACKWARD = FORWARD + 2 * BATCH * 32 * 4
FLOPCOUNT = [sys.executable, "-m", "flopcount.cli", "run", "--backend", "dispatch"]


def console_script(name, module):
    """The venv's console script, or ``python -m module`` where it is not installed as one."""
    return [str(BIN / name)] if (BIN / name).exists() else [sys.executable, "-m", module]


def run_metered(out, command, timeout=240, **env):
    environ = {**os.environ, "STEPS": str(STEPS), **env}
    environ.pop("FLOPCOUNT_RUN", None)
    return subprocess.run([*FLOPCOUNT, "--out", str(out), "--", *command], env=environ, cwd=SCRIPTS,
                          capture_output=True, text=True, timeout=timeout)


def assert_per_rank_matmuls(out, ranks, eval_forwards=0, micro_batches=1):
    summary = flopcount.summarize(str(out))
    cats = summary["by_phase_category"]
    assert sorted(summary["ranks"]) == list(range(ranks)) and summary["world_size"] == ranks
    assert cats["forward"]["matmul"] == ranks * STEPS * micro_batches * FORWARD
    assert cats["backward"]["matmul"] == ranks * STEPS * micro_batches * BACKWARD
    assert cats.get("eval", {}).get("matmul", 0) == ranks * eval_forwards * FORWARD
    assert summary["steps"] == STEPS  # the optimizer steps (ranks of one step count once)
    steps = read_table(str(out), "steps").to_pandas()
    for rank in range(ranks):  # one step per optimizer step on every rank, then trailing work
        rows = steps[(steps["rank"] == rank)].sort_values("step")
        assert (rows["training_flops"] > 0).sum() == STEPS
        assert (~rows["trailing"].astype(bool)).sum() == STEPS
    return summary


def test_run_meters_an_unmodified_script_and_passes_its_exit_code(tmp_path):
    result = run_metered(tmp_path / "run", [sys.executable, "train_plain.py"], EXIT="3")
    assert result.returncode == 3, result.stderr[-2000:]
    assert_per_rank_matmuls(tmp_path / "run", ranks=1, eval_forwards=1)
    assert "flopcount compliance summary" in result.stdout and "status               below" in result.stdout
    assert "exited with status 3" in result.stdout
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "report.json").is_file()


def test_run_python_m_after_an_exception_keeps_the_traces(tmp_path):
    result = run_metered(tmp_path / "run", [sys.executable, "-m", "train_plain"], RAISE="1")
    assert result.returncode == 1
    assert "the training script failed" in result.stderr  # the program's own traceback, untouched
    assert_per_rank_matmuls(tmp_path / "run", ranks=1, eval_forwards=1)


def test_run_on_sigterm_flushes_and_reports(tmp_path):
    ready = tmp_path / "ready"
    environ = {**os.environ, "STEPS": str(STEPS), "READY_FILE": str(ready)}
    proc = subprocess.Popen([*FLOPCOUNT, "--out", str(tmp_path / "run"), "--", sys.executable, "train_plain.py"],
                            env=environ, cwd=SCRIPTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to `flopcount run`, which passes it on to the script
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert_per_rank_matmuls(tmp_path / "run", ranks=1, eval_forwards=1)
    assert "flopcount compliance summary" in stdout


def test_run_torchrun_two_ranks(tmp_path):
    torchrun = console_script("torchrun", "torch.distributed.run")
    result = run_metered(tmp_path / "run", [*torchrun, "--nproc-per-node", "2", "--standalone", "train_ddp.py"],
                         OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = assert_per_rank_matmuls(tmp_path / "run", ranks=2)
    assert summary["by_phase"].get("eval", 0) == 0
    assert "2 rank(s)" in result.stdout


def test_run_torchrun_budget_stops_every_rank_at_the_same_step(tmp_path):
    torchrun = console_script("torchrun", "torch.distributed.run")
    budget = 300_000  # job-wide (both ranks): a handful of steps of ~26k FLOPs per rank
    result = subprocess.run([*FLOPCOUNT, "--out", str(tmp_path / "run"), "--budget", str(budget), "--", *torchrun,
                             "--nproc-per-node", "2", "--standalone", "train_ddp.py"],
                            env={**os.environ, "STEPS": "50", "OMP_NUM_THREADS": "1"}, cwd=SCRIPTS,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    steps = read_table(str(tmp_path / "run"), "steps").to_pandas()
    per_rank = steps.groupby("rank")["step"].apply(sorted).tolist()
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] and len(per_rank[0]) < 50  # one decision for all
    job_steps = steps.groupby("step")["training_flops"].sum()
    total = int(job_steps.sum())
    assert total < budget <= total + int(job_steps.max())  # stopped before crossing, not earlier


def test_run_meters_ranks_started_by_multiprocessing_spawn(tmp_path):
    """mp.spawn's ranks are metered like torchrun's; their spawn-started DataLoader workers are not
    metered and the parent, which only spawns, never steps: exactly two ranks' steps."""
    result = run_metered(tmp_path / "run", [sys.executable, "train_spawn.py"], OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = assert_per_rank_matmuls(tmp_path / "run", ranks=2)
    assert summary["by_phase"].get("eval", 0) == 0


WORKER_CONTEXTS = ["spawn", "forkserver", "fork"]


@pytest.mark.parametrize("context", WORKER_CONTEXTS)
def test_run_strict_leaves_dataloader_workers_unmetered(tmp_path, context, backend):
    """DataLoader workers prepare data (collate, transforms), not the model's training compute:
    they are not metered (docs/conventions.md, "Data loading"). Their collate runs aten.median,
    which has no formula: metered under --strict, it raised in the worker and ended the training.
    The training process is metered as ever: exactly the closed form, no uncounted op."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flopcount.cli", "run", "--strict", "--backend", backend, "--out", str(out),
               "--", sys.executable, "train_loader.py"]
    environ = {**os.environ, "STEPS": str(STEPS), "CONTEXT": context, "WORKERS": "2", "OMP_NUM_THREADS": "1"}
    environ.pop("FLOPCOUNT_RUN", None)
    result = subprocess.run(command, env=environ, cwd=SCRIPTS, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UncountedOpError" not in result.stderr and ": verified; digest" in result.stdout
    summary = assert_per_rank_matmuls(out, ranks=1)
    assert summary["uncounted_ops"] == {} and not any("median" in op for op in summary["by_op"])
    assert sorted(os.listdir(out / "manifest")) == ["r00000.jsonl"]  # one writer: the training process
    assert subprocess.run([sys.executable, "-m", "flopcount.cli", "verify", str(out)],
                          capture_output=True, timeout=120).returncode == 0


FORKED_WORKERS_UNDER_A_METER = textwrap.dedent("""
    import sys
    import flopcount, train_loader
    if __name__ == "__main__":
        with flopcount.meter(out=sys.argv[1], strict=True, backend=sys.argv[2], flush_every=1):
            train_loader.main()
""")


@pytest.mark.parametrize("context", WORKER_CONTEXTS)
def test_a_strict_meter_leaves_its_dataloader_workers_unmetered(tmp_path, context, backend):
    """Without `flopcount run`: a fork-started worker inherits a copy of the meter, whose strict
    mode raised in the worker; and its copy of the trace writer (flush_every=1) must never write
    the parent's files."""
    script = tmp_path / "metered.py"
    script.write_text(FORKED_WORKERS_UNDER_A_METER)
    out = tmp_path / "run"
    environ = {**os.environ, "STEPS": str(STEPS), "CONTEXT": context, "WORKERS": "2", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    environ.pop("FLOPCOUNT_RUN", None)
    result = subprocess.run([sys.executable, str(script), str(out), backend], env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = assert_per_rank_matmuls(out, ranks=1)
    assert summary["uncounted_ops"] == {}
    assert subprocess.run([sys.executable, "-m", "flopcount.cli", "verify", str(out)],
                          capture_output=True, timeout=120).returncode == 0


def test_run_strict_dark_module_at_exit_closes_the_trace_once_and_fails_the_run(tmp_path):
    """Under --strict a dark module found when the meter closes at exit (the program's last work)
    is an error, raised once the trace is closed. It used to reach `flopcount run`'s process
    bootstrap as a failure of the close: the bootstrap closed the writer a second time (a second
    close entry, written after the lease was given back) and the run exited 0."""
    out = tmp_path / "run"
    result = subprocess.run([*FLOPCOUNT, "--strict", "--out", str(out), "--", sys.executable, "train_dark_end.py"],
                            env={**os.environ, "STEPS": str(STEPS)}, cwd=SCRIPTS, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "module(s) whose forward booked no FLOPs: 1 (__main__.NumpyLinear)" in result.stderr
    assert "Traceback" not in result.stderr and "after an error" not in result.stderr
    entries = [json.loads(line) for line in (out / "manifest" / "r00000.jsonl").read_text().splitlines()]
    assert [e["type"] for e in entries] == ["segment", "part", "close"]
    # The steps and the trailing row, all written: the close counts the optimizer steps and the rows
    # (its steps counted the rows before).
    assert entries[-1]["steps"] == STEPS and entries[-1]["rows"] == STEPS + 1
    summary = flopcount.summarize(str(out))
    cats = summary["by_phase_category"]
    assert cats["forward"]["matmul"] == STEPS * FORWARD and cats["backward"]["matmul"] == STEPS * BACKWARD
    assert cats["eval"]["matmul"] == 2 * BATCH * 16 * 4  # the final evaluation's Linear 16 -> 4
    assert summary["steps"] == STEPS and summary["dark_modules"] == {"1": "__main__.NumpyLinear"}
    assert subprocess.run([sys.executable, "-m", "flopcount.cli", "verify", str(out)],
                          capture_output=True, timeout=120).returncode == 0
    assert (out / "report.md").is_file()  # the report is written all the same


def test_run_accelerate_launch_two_processes(tmp_path):
    pytest.importorskip("accelerate")
    accelerate = console_script("accelerate", "accelerate.commands.accelerate_cli")
    # --multi_gpu picks accelerate's torchrun-style launcher; without CUDA it runs gloo on CPU.
    result = run_metered(tmp_path / "run", [*accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                                            "--num_machines", "1", "--mixed_precision", "no",
                                            "--dynamo_backend", "no", "train_accelerate.py"], OMP_NUM_THREADS="1",
                          ACCUM="2")
    assert result.returncode == 0, result.stderr[-3000:]
    # Gradient accumulation: 2 micro-batches per optimizer step, steps are the optimizer's.
    assert_per_rank_matmuls(tmp_path / "run", ranks=2, micro_batches=2)


def test_run_budget_stops_the_script_in_one_line(tmp_path):
    budget = 5 * (FORWARD + BACKWARD)  # a few steps' worth (steps also do pointwise and optimizer work)
    result = subprocess.run([*FLOPCOUNT, "--out", str(tmp_path / "run"), "--budget", str(budget), "--",
                             sys.executable, "train_plain.py"], env={**os.environ, "STEPS": "100"}, cwd=SCRIPTS,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1
    assert "flopcount: budget guard stopped training after step" in result.stderr
    assert "Traceback" not in result.stderr
    summary = flopcount.summarize(str(tmp_path / "run"))
    assert 0 < summary["training_flops"] < budget
    assert summary["steps"] < 5


def test_run_with_a_missing_program_is_a_one_line_error(tmp_path):
    result = subprocess.run([*FLOPCOUNT, "--out", str(tmp_path / "run"), "--", "no-such-program-flopcount"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "flopcount: cannot start 'no-such-program-flopcount': " \
                                                     "No such file or directory"


def test_run_without_a_command_is_a_one_line_error(tmp_path, capsys):
    from flopcount.cli import main

    assert main(["run", "--out", str(tmp_path / "run"), "--"]) == 2
    assert capsys.readouterr().err.startswith("flopcount: no command to run: write it after `--`")


def test_run_rejects_an_unknown_base_model_before_starting(tmp_path):
    result = subprocess.run([*FLOPCOUNT, "--out", str(tmp_path / "run"), "--base-model", "llama-9000", "--",
                             sys.executable, "-c", "open('started', 'w')"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not in the registry" in result.stderr
    assert not (tmp_path / "started").exists()


def test_run_keeps_the_programs_own_sitecustomize(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("open('sitecustomize-ran', 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("FLOPCOUNT_RUN", None)
    result = subprocess.run([*FLOPCOUNT, "--out", str(tmp_path / "run"), "--", sys.executable, "-c", "pass"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert (tmp_path / "sitecustomize-ran").exists()  # chained after flopcount's own
    assert "no trace in" in result.stderr  # no torch: nothing metered, no trace
    assert not (tmp_path / "run" / "manifest").exists()
