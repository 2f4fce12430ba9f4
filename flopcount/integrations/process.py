"""The metered side of ``flopcount run``: started in each Python process by its sitecustomize.

``start()`` runs right after the program imported torch. It opens a meter for the rest of the
process (steps close after each ``optimizer.step()``), unless the process is a launcher that only
starts workers, or a multiprocessing helper (forkserver, resource tracker). A DataLoader worker
stops its meter when its worker loop starts (integrations/dataloader.py): it is not metered.
Processes that never step (the parent of ``mp.spawn`` ranks) write nothing.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading

from ..distributed import rank_and_world_size
from ..errors import UncountedOpError, one_line
from ..meter import Meter
from ..trace.schema import MANIFEST_DIR
from .launcher import ENV_VAR, PARENT_VAR
from .tags import install as install_tags

# Programs that only start workers: console-script names and `python -m` modules.
LAUNCHER_SCRIPTS = frozenset({"torchrun", "accelerate", "deepspeed"})
LAUNCHER_MODULES = frozenset({"torch.distributed.run", "torch.distributed.launch", "accelerate.commands.launch",
                              "accelerate.commands.accelerate_cli", "deepspeed.launcher.runner",
                              "deepspeed.launcher.launch"})


class LazyWriterMeter(Meter):
    """A Meter that opens its trace writer at its first closed step: by then the process knows
    its rank (``init_process_group`` has run), and a process that never steps writes nothing."""

    def __init__(self, out, **options) -> None:
        super().__init__(None, **options)
        self.lazy_out = out

    def _close_step(self, *args, **kwargs):
        if self.writer is None and self.lazy_out is not None:
            self.rank, self.world_size = rank_and_world_size()
            self.out, self.lazy_out = self.lazy_out, None
            try:  # inside the training loop now: a storage fault must not end the program
                self.writer = self.open_writer(first_free=True)  # its own writer slot: r00000, r00000-p1, ...
            except Exception as e:
                sys.stderr.write(f"flopcount: NOT writing a trace for pid {os.getpid()} to {self.out}: {e}\n")
        return super()._close_step(*args, **kwargs)


def launcher_name(argv: list[str], main_module: str | None) -> str | None:
    """The launcher this process is (by console script or ``-m`` module), or None."""
    script = os.path.basename(argv[0]) if argv else ""
    if script in LAUNCHER_SCRIPTS:
        return script
    if main_module in LAUNCHER_MODULES:
        return main_module
    return None


def main_module(orig_argv: list[str]) -> str | None:
    """The module of ``python -m MODULE`` (sys.argv[0] is only '-m' while the program imports)."""
    if "-m" in orig_argv[1:]:
        i = orig_argv.index("-m", 1)
        return orig_argv[i + 1] if i + 1 < len(orig_argv) else None
    return None


def multiprocessing_helper(orig_argv: list[str]) -> bool:
    """multiprocessing's forkserver or resource tracker (``-c 'from multiprocessing...'``): they run no
    program code. Children started by spawn (``--multiprocessing-fork``: ``mp.spawn`` ranks,
    spawn-started DataLoader workers) run the program's code and are metered from their start;
    a DataLoader worker stops its meter when its worker loop starts (integrations/dataloader.py)."""
    return "--multiprocessing-fork" not in orig_argv and any(a.startswith("from multiprocessing") for a in orig_argv)


def start() -> Meter | None:
    """Open the meter for the rest of this process; None when this process is not metered."""
    orig_argv = list(getattr(sys, "orig_argv", sys.argv))
    if launcher_name(sys.argv, main_module(orig_argv)) or multiprocessing_helper(orig_argv):
        return None
    try:
        config = json.loads(os.environ[ENV_VAR])
        meter = LazyWriterMeter(config.pop("out"), **config)
        meter.__enter__()
        install_tags()  # the Trainer's evaluation, TRL's generation / reference / teacher / reward work
    except Exception as e:  # never break the program's `import torch`; say loudly that it is unmetered
        sys.stderr.write(f"flopcount: NOT metering {' '.join(sys.argv)} (pid {os.getpid()}): {e}\n")
        return None
    pid = os.getpid()
    atexit.register(finish, meter, pid)
    _install_sigterm_handler(meter, pid)
    _install_excepthook()
    return meter


def finish(meter, pid: int) -> None:
    """Close the meter once, in the process that opened it (not in forked children)."""
    if os.getpid() != pid or not meter._active:
        return
    if meter.writer is None and meter.step_index == 0 and meter.lazy_out is not None:
        # Never stepped: keep its work only when this is COMMAND itself and nobody else wrote.
        is_command = os.environ.get(PARENT_VAR) == str(os.getppid())
        if not is_command or os.path.isdir(os.path.join(meter.lazy_out, MANIFEST_DIR)):
            meter.lazy_out = None
    try:
        meter.__exit__(None, None, None)
    except UncountedOpError as e:  # strict: found as the meter closed, raised once its trace was closed
        sys.stderr.write(f"{one_line(e)}\n")  # `flopcount run --strict` exits 1 for it (launcher.py)
    except Exception as e:  # e.g. interrupted inside an op: still save what the writer holds (once)
        if meter.writer is not None:
            meter.writer.close(meter.summary())
        sys.stderr.write(f"flopcount: closed the meter after an error: {e}\n")


def _install_sigterm_handler(meter, pid: int) -> None:
    """On SIGTERM close the meter, then die of SIGTERM as the program would have."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the program handles SIGTERM itself; atexit still closes the meter

    def on_sigterm(signum, frame):
        finish(meter, pid)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _install_excepthook() -> None:
    """A BudgetExceeded that ends the program is reported in one line, not as a traceback."""
    from ..budget import BudgetExceeded

    previous = sys.excepthook

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, BudgetExceeded):
            sys.stderr.write(f"{exc}\n")
        else:
            previous(exc_type, exc, tb)

    sys.excepthook = excepthook
