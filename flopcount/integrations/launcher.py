"""``flopcount run -- COMMAND ...``: meter an unmodified training program, every process of it.

How it works
- The parent (``run``) starts COMMAND with two environment variables: FLOPCOUNT_RUN (the meter's
  options as JSON) and PYTHONPATH led by the ``_sitecustomize`` directory. Every Python process
  started below it (``python train.py``, ``python -m pkg``, torchrun's and ``accelerate launch``'s
  workers) imports that ``sitecustomize`` at start-up (process.py does the metering). Without
  FLOPCOUNT_RUN, ``sitecustomize`` does nothing.
- ``sitecustomize`` waits until the program imports torch itself (so that environment variables the
  program sets before ``import torch`` still work), then opens a meter around the rest of the
  process. Launcher processes (torchrun, accelerate, deepspeed) are not metered: they only start
  workers; nor are DataLoader workers (integrations/dataloader.py). Steps close after each ``optimizer.step()``; evaluation (no grad) is its own phase.
- A process opens its trace writer at its first closed step, when its rank is known (after
  ``init_process_group``); a process that never steps (a launcher, a data-prep helper, the parent of
  ``mp.spawn`` ranks) writes nothing, unless it is COMMAND itself and nobody else wrote a trace.
- At exit, also after an exception or SIGTERM, the process closes its meter (flushes its trace).
  Then the parent writes ``report.md`` / ``report.json`` into the trace dir, prints the compliance
  summary, and exits with COMMAND's exit code (128 + N when COMMAND died of signal N; 1 when it
  succeeded but its trace does not verify, or under --strict records what strict forbids: a
  dark module or uncounted op found as a meter closed at exit, which no program can catch).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

from ..config import run_options
from ..errors import BadInput, IntegrityError, one_line

ENV_VAR = "FLOPCOUNT_RUN"            # JSON: the meter's options; its presence switches metering on
PARENT_VAR = "FLOPCOUNT_RUN_PARENT"  # pid of `flopcount run`, to recognise COMMAND's own process
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sitecustomize")
REPORT_FORMATS = ("md", "json")

# Options of the meter that `flopcount run` passes on (JSON-serialisable values only): MeterConfig's
# fields marked ``run`` (config.py).
METER_OPTIONS = run_options()


# ---- parent: `flopcount run` -------------------------------------------------------------------

def child_env(out: str, options: dict, environ=None) -> dict:
    """The environment COMMAND runs in: ours plus FLOPCOUNT_RUN and the sitecustomize path."""
    env = dict(os.environ if environ is None else environ)
    config = {"out": os.path.abspath(out), **{k: v for k, v in options.items() if k in METER_OPTIONS}}
    env[ENV_VAR] = json.dumps(config)
    env[PARENT_VAR] = str(os.getpid())
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = SITE_DIR + (os.pathsep + path if path else "")
    return env


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code: 128 + N when it died of signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run(command: list[str], out: str, options: dict) -> int:
    """Run ``command`` metered; write the report and print the compliance summary; its exit status."""
    if not command:
        raise BadInput("flopcount: no command to run: write it after `--`, e.g. flopcount run -- python train.py")
    check_out(out)  # exit 2 before COMMAND starts, not a traceback at its first step
    env = child_env(out, options)
    sys.stderr.write(f"flopcount: metering `{' '.join(command)}` -> {os.path.abspath(out)}\n")
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as e:
        raise BadInput(f"flopcount: cannot start {command[0]!r}: {e.strerror}") from None
    status = exit_status(_wait_forwarding_signals(child))
    report = finish_report(out, options, status)
    verified = report["integrity"]["verified"] if report else report
    if status == 0 and verified is False:
        return 1  # a trace that does not verify is a finding
    finding = strict_finding(report["method"]) if status == 0 and options.get("strict") and report else None
    if finding:
        sys.stderr.write(f"{finding}\n")
        return 1
    return status


def strict_finding(method: dict) -> str | None:
    """What ``--strict`` forbids and the trace records anyway (one line), or None. The program
    met it in its last step or trailing work, found as its meter closed at exit: too late to
    raise into the program, so the run fails here."""
    found = [f"{what} {', '.join(names)}" for what, names in
             (("dark module(s)", method.get("dark_modules") or {}), ("uncounted op(s)", method.get("uncounted_ops") or {}))
             if names]
    return f"flopcount: --strict: the trace records {' and '.join(found)}" if found else None


def check_out(out: str) -> None:
    """Refuse, before COMMAND starts, an ``--out`` that cannot be written (trace/storage.py
    ``check_writable``) or that another live writer holds (another `flopcount run` or meter on the
    same directory): one line, exit 2."""
    from ..trace.lease import active_holders, describe_holder
    from ..trace.storage import check_writable, open_storage

    check_writable(out)
    holders = active_holders(open_storage(out))
    if holders:
        raise BadInput(f"flopcount: --out {out} is being written by another meter ({describe_holder(holders[0])}; "
                       f"lease {holders[0]['lease']}): wait for it to finish, or pass another --out")


def _wait_forwarding_signals(child: subprocess.Popen) -> int:
    """Wait for ``child``; pass SIGTERM/SIGHUP on to it. Ctrl-C reaches it through the terminal's
    process group, so we only keep ourselves alive for the report."""
    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, forward)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        while True:
            try:
                return child.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def finish_report(out: str, options: dict, status: int) -> dict | bool | None:
    """Write report.md and report.json into ``out`` and print the compliance summary, with the
    integrity check's result and the trace digest to keep. The report; False: the trace does not
    verify and cannot be read; None: no report."""
    from ..report import RENDERERS, build_report
    from ..report.text import report_summary
    from ..trace.schema import MANIFEST_DIR
    from ..trace.storage import TraceError

    base = {"base_model": options.get("base_model"), "base_model_flops": options.get("base_model_flops")}
    if not os.path.isdir(os.path.join(out, MANIFEST_DIR)):
        sys.stderr.write(f"flopcount: no trace in {out}: the command (exit status {status}) ended before any "
                         f"Python process under it ran a step with torch\n")
        return None
    try:
        report = build_report(out, **base)
        written = []
        for fmt in REPORT_FORMATS:
            path = os.path.join(out, f"report.{fmt}")
            with open(path, "w", encoding="utf-8") as f:
                f.write(RENDERERS[fmt](report))
            written.append(path)
        sys.stdout.write(report_summary(report) + "\n")
    except IntegrityError as e:  # the trace does not verify and cannot be read: no report, a finding
        for problem in e.problems:
            sys.stderr.write(f"flopcount: integrity: {problem}\n")
        sys.stderr.write(f"flopcount: no report for {out}: {one_line(e)}\n")
        return False
    except (TraceError, OSError) as e:  # the command's exit status still goes through
        sys.stderr.write(f"flopcount: no report for {out}: {e}\n")
        return None
    sys.stdout.write(f"  report               {', '.join(written)}\n")
    if status:
        sys.stdout.write(f"  command              exited with status {status}\n")
    sys.stdout.flush()
    return report
