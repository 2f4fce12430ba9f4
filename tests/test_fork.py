"""Children forked from a metered process (os.fork, multiprocessing's fork start method) are not
metered (docs/conventions.md, "Data loading"): the meters they inherit stop
in the child at the fork, book nothing and never touch the parent's trace.

Real subprocesses: the parent trains w [16,4] on X [8,16] with SGD for two steps (automatic
steps, flush_every=1) and forks in between; its children train the same way on their own and
exit normally. A copy of the meter in a child would close steps at the child's optimizer steps
and write them, and its ``__exit__`` (os.fork's child unwinds through ``with``) the close entry,
into the parent's trace directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import flopcount

STEPS = 2
MATMUL = 2 * 8 * 16 * 4  # X @ w forward; its backward X^T @ grad (X needs no gradient) is the same

FORKING_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import multiprocessing as mp
    import torch
    import flopcount
    from tracegen import tree_digest as snapshot  # tests/ is on PYTHONPATH (run_script)

    X = torch.randn(8, 16)

    def train(w, opt, steps=1):
        for _ in range(steps):
            (X @ w).sum().backward()
            opt.step()
            opt.zero_grad()

    def child(_=None):
        w = torch.randn(16, 4, requires_grad=True)
        train(w, torch.optim.SGD([w], lr=0.1), steps=2)
        X @ w  # the next step's first op: where a copy of the meter closed the step
        return 0

    def fork_children(how):
        if how == "os.fork":
            pid = os.fork()
            if pid == 0:
                child()
                sys.exit(0)  # unwinds through `with flopcount.meter(...)` in the child
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
        elif how == "multiprocessing-fork":
            ctx = mp.get_context("fork")
            p = ctx.Process(target=child)
            p.start()
            p.join()
            assert p.exitcode == 0, p.exitcode
            pool = ctx.Pool(2)  # a preprocessing pool
            assert pool.map(child, range(4)) == [0] * 4
            pool.close()
            pool.join()

    if __name__ == "__main__":
        out, backend, how = sys.argv[1:]
        w = torch.randn(16, 4, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)
        with flopcount.meter(out=out, backend=backend, flush_every=1) as m:
            train(w, opt)
            before = snapshot(out)
            fork_children(how)
            assert snapshot(out) == before, "a forked child wrote into the parent's trace"
            train(w, opt)
        print(json.dumps(m.summary()["training_flops"]))
""")


def run_script(tmp_path, name, backend, how):
    script = tmp_path / "forking.py"
    script.write_text(FORKING_SCRIPT)
    out = tmp_path / name
    tests = os.path.dirname(os.path.abspath(__file__))
    environ = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    environ.pop("FLOPCOUNT_RUN", None)
    result = subprocess.run([sys.executable, str(script), str(out), backend, how], env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    return out, json.loads(result.stdout), result.stderr


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing-fork"])
def test_forked_children_are_not_metered_and_leave_the_trace_alone(tmp_path, backend, how):
    out, live_training_flops, stderr = run_script(tmp_path, "run", backend, how)
    # A child that trains is told, once per process, that its work is in no trace.
    assert "runs optimizer steps that no meter counts (forked children are not metered)" in stderr
    verify = subprocess.run([sys.executable, "-m", "flopcount.cli", "verify", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert sorted(os.listdir(out / "manifest")) == ["r00000.jsonl"]  # one writer: the parent
    summary = flopcount.summarize(str(out))
    cats = summary["by_phase_category"]
    assert cats["forward"]["matmul"] == cats["backward"]["matmul"] == STEPS * MATMUL  # the parent's, in closed form
    assert summary["steps"] == STEPS and summary["uncounted_ops"] == {}
    assert summary["training_flops"] == live_training_flops
    unforked, _, stderr = run_script(tmp_path, "unforked", backend, "none")  # the same training without children
    assert "flopcount:" not in stderr
    alone = flopcount.summarize(str(unforked))
    for key in ("training_flops", "hardware_flops", "by_phase_category", "by_op", "steps"):
        assert summary[key] == alone[key], key
