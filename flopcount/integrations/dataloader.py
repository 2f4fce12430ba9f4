"""DataLoader worker processes are not metered (docs/conventions.md, "Data loading").

A worker prepares batches (fetching, collate, transforms): data preparation, not the model's
training compute. What a meter would count there could never reach the trace either: a worker
started by fork holds a copy of its parent's meter (whose trace belongs to the parent), one
started by spawn or forkserver under ``flopcount run`` a meter of its own that never steps. And
counting there harms: in strict mode an op of a data transform without a formula raised in the
worker, which ended the training.

Every worker, however it is started, runs torch's worker loop (``_worker_loop``, the target of
its process). ``install`` (Meter.__enter__, once per process) wraps it: the wrapper stops every
meter active in the worker (``Meter.stop_in_worker``) before the loop runs. The training process
only hands the wrapper to its workers: a forked worker calls it (its inherited meters already
stopped at the fork, like those of every forked child: capture/active.py), a spawned one looks
it up by name in its own flopcount-patched torch (``flopcount run``) or gets torch's own loop.
"""
from __future__ import annotations

import functools

from torch.utils.data._utils import worker

from ..capture.active import HOOKS


def install() -> None:
    """Wrap torch's DataLoader worker loop (idempotent)."""
    loop = worker._worker_loop
    if getattr(loop, "flopcount_unmetered", False):
        return

    @functools.wraps(loop)  # the same module and name: a spawn-started worker unpickles it by name
    def _worker_loop(*args, **kwargs):
        stop_meters_in_worker()
        return loop(*args, **kwargs)

    _worker_loop.flopcount_unmetered = True
    worker._worker_loop = _worker_loop


def stop_meters_in_worker() -> None:
    """Stop every meter active in this DataLoader worker; a failure only says so (the worker runs on).
    A fork-started worker has none left: they stopped at the fork (capture/active.py)."""
    HOOKS.stop_meters("DataLoader worker")
