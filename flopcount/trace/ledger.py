"""The digest ledger: an append-only JSON-lines log, kept outside the trace dir, of every digest a
writer saw when it closed (``meter(..., ledger=PATH_OR_URI)``; ``flopcount verify --ledger PATH``).

One line per closing writer: ``{"dir", "run_id", "rank", "process", "segment_id", "digest",
"time", "time_utc"}``. Whoever can rewrite the ledger can roll it back with the trace dir: keep it
where the people who edit traces cannot write (another host, a WORM bucket, a git repository).
"""
from __future__ import annotations

from ..errors import BadInput

import json
import os
import time

from .storage import TraceError, _URI

LEDGER_FIELDS = ("dir", "run_id", "digest", "time")


def check_location(ledger) -> str:
    """``ledger`` as a location string; ValueError (one line) when a local ledger cannot be written."""
    location = os.fspath(ledger)
    if _URI.match(location) and not location.startswith("file://"):
        return location
    path = location[len("file://"):] if location.startswith("file://") else location
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise BadInput(f"flopcount: ledger={location}: {directory} is not a writable directory; "
                         "create it or pass another ledger path")
    if os.path.exists(path) and not os.path.isfile(path):
        raise BadInput(f"flopcount: ledger={location} is not a regular file")
    return os.path.abspath(path)


def append(ledger: str, record: dict) -> None:
    """Append one record (a local file: one O_APPEND write under an exclusive lock)."""
    line = (json.dumps(dict(record, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["time"]))),
                       sort_keys=True) + "\n").encode()
    if _URI.match(ledger):
        import fsspec

        fs, path = fsspec.core.url_to_fs(ledger)
        try:
            with fs.open(path, "ab") as f:
                f.write(line)
        except (NotImplementedError, ValueError):  # a store without appends: rewrite the whole object
            old = fs.cat_file(path) if fs.exists(path) else b""
            with fs.open(path, "wb") as f:
                f.write(old + line)
        return
    import fcntl

    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(ledger) -> list[dict]:
    """The ledger's records; TraceError (exit 2) when it is missing or malformed."""
    location = os.fspath(ledger)
    try:
        if _URI.match(location) and not location.startswith("file://"):
            import fsspec

            fs, path = fsspec.core.url_to_fs(location)
            data = fs.cat_file(path)
        else:
            path = location[len("file://"):] if location.startswith("file://") else location
            if not os.path.isfile(path):
                raise TraceError(f"flopcount: ledger {location} is not a file: pass the ledger= file of the run")
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, ImportError) as e:
        raise TraceError(f"flopcount: cannot read the ledger {location}: {e}") from None
    records = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except (ValueError, RecursionError):
            raise TraceError(f"flopcount: ledger {location} line {number} is not valid JSON") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("dir", "digest")):
            raise TraceError(f"flopcount: ledger {location} line {number} is not a ledger record "
                             "(needs dir and digest strings)")
        records.append(record)
    return records


def last_for(records: list[dict], location: str, run_ids: list[str]) -> dict | None:
    """The last record of the trace dir at ``location`` (by its path; else by its run id)."""
    wanted = os.path.abspath(location) if not _URI.match(location) else location.rstrip("/")
    by_dir = [r for r in records if r["dir"].rstrip("/") == wanted]
    if by_dir:
        return by_dir[-1]
    by_run = [r for r in records if r.get("run_id") in run_ids]
    return by_run[-1] if by_run else None
