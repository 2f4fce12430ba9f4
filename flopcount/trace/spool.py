"""Parts waiting to be written: storage faults never reach the training loop.

The writer hands each flushed window of steps to the ``Spool`` as a ``PendingPart`` (its Parquet
files, already encoded in memory) and the spool commits the oldest first. When a commit fails (disk
full, read-only file system, permission denied, an object-store error: any exception from the
storage) the part stays in memory and is retried at the next flush and at exit. One warning per
kind of failure names the path and the number of steps not yet written.

Memory is bounded: at most ``max_unwritten_steps(flush_every)`` steps (10 x flush_every, at least
1000) are held; past that the oldest parts are dropped and their step range is recorded. The
segment's ``close`` entry lists ``unwritten``: the step ranges dropped or still unwritten at exit,
which every integrity check reports as a finding (docs/traces.md, "Storage faults").
"""
from __future__ import annotations

import errno
import re
import sys
import warnings
from collections import deque
from dataclasses import dataclass, field

MIN_UNWRITTEN_STEPS = 1000
UNWRITTEN_FLUSHES = 10


def max_unwritten_steps(flush_every: int) -> int:
    """How many unwritten steps a writer holds in memory before it drops the oldest."""
    return max(MIN_UNWRITTEN_STEPS, UNWRITTEN_FLUSHES * int(flush_every))


class StorageWarning(UserWarning):
    """A trace write failed; the meter keeps the steps and retries (training goes on)."""


@dataclass
class PendingPart:
    """One flushed window of steps: [first_step, last_step], its row count, its encoded files and
    the number of the step after it (``last_step``, not one more, when its last row is trailing)."""
    first_step: int
    last_step: int
    rows: int
    files: dict = field(default_factory=dict)  # table name -> (Parquet bytes, rows)
    next_step: int | None = None  # None: last_step + 1


def fault_kind(exc: BaseException) -> str:
    """ENOSPC, EROFS, EACCES, ... for OS errors, else the exception's class (object stores)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return errno.errorcode[code]
    return type(exc).__name__


def merge_ranges(ranges) -> list[list[int]]:
    """Sorted, merged [first, last] step ranges (adjacent ranges join)."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged


def format_ranges(ranges) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def warn(message: str) -> None:
    """A StorageWarning that cannot itself break training (``-W error`` turns warnings into exceptions)."""
    try:
        warnings.warn(message, StorageWarning, stacklevel=2)
    except Exception:
        sys.stderr.write(message + "\n")


class Spool:
    """The writer's queue of parts not yet written. ``commit(part)`` writes one part and its manifest
    entry, raising on a storage fault (the part then stays queued); ``location`` names the trace dir."""

    def __init__(self, commit, max_steps: int, location: str, rank: int = 0) -> None:
        self.commit = commit
        self.max_steps = int(max_steps)
        self.location = location
        self.rank = rank
        self.pending: deque[PendingPart] = deque()
        self.dropped: list[list[int]] = []  # step ranges dropped from memory
        self.warned: set[str] = set()       # fault kinds already reported
        self.last_fault: BaseException | None = None

    @property
    def pending_steps(self) -> int:
        return sum(part.rows for part in self.pending)

    def add(self, part: PendingPart) -> None:
        self.pending.append(part)
        while len(self.pending) > 1 and self.pending_steps > self.max_steps:
            oldest = self.pending.popleft()
            self.dropped.append([oldest.first_step, oldest.last_step])
            if "dropped" not in self.warned:
                self.warned.add("dropped")
                warn(f"flopcount: rank {self.rank}: more than {self.max_steps} steps could not be written to "
                     f"{self.location}; dropping the oldest from memory (steps {oldest.first_step}-"
                     f"{oldest.last_step} first); the dropped steps are recorded as unwritten")

    def drain(self) -> bool:
        """Commit the pending parts, oldest first; stop at the first fault. True when none is left."""
        while self.pending:
            try:
                self.commit(self.pending[0])
            except Exception as exc:  # a storage fault: keep the part, retry later
                self.fault(exc)
                return False
            self.pending.popleft()
        return True

    def fault(self, exc: BaseException) -> None:
        self.last_fault = exc
        kind = fault_kind(exc)
        if kind in self.warned:
            return
        self.warned.add(kind)
        warn(f"flopcount: rank {self.rank}: cannot write the trace to {_fault_path(exc, self.location)} "
             f"({kind}: {_reason(exc)}); {self.pending_steps} step(s) not yet written are kept in memory "
             f"(at most {self.max_steps}) and retried at the next flush and at exit")

    def unwritten(self) -> list[list[int]]:
        """Step ranges dropped or not written (yet)."""
        return merge_ranges(self.dropped + [[p.first_step, p.last_step] for p in self.pending])

    def report_exit(self, close_written: bool) -> None:
        """At exit: one warning saying what could not be written (nothing when everything was)."""
        unwritten = self.unwritten()
        if not unwritten and close_written:
            return
        why = f" ({fault_kind(self.last_fault)}: {_reason(self.last_fault)})" if self.last_fault else ""
        steps = f"steps {format_ranges(unwritten)}" if unwritten else ""
        if close_written:
            warn(f"flopcount: {steps} of rank {self.rank} could not be written to {self.location}{why}; the "
                 f"segment's close entry records them as unwritten and `flopcount verify` reports them")
        else:
            warn(f"flopcount: {steps + ' and ' if steps else ''}the close entry of rank {self.rank} could not be "
                 f"written to {self.location}{why}; `flopcount verify` reports the segment as not closed")


def _fault_path(exc: BaseException, location: str) -> str:
    path = getattr(exc, "filename", None)
    return re.sub(r"\.tmp-\d+$", "", str(path)) if path else location  # the file, not its temp name


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0][:200]
