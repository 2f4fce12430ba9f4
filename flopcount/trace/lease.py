"""One writer per (trace dir, rank, process): the lease a TraceWriter holds while it writes.

A writer (``r00000``, or ``r00000-p1`` for a second metered process of rank 0 under ``flopcount
run``) takes ``lease/<writer>.lease`` before it reads or writes anything of its own, and gives
it back at close. Two kinds, chosen by the storage:

- Local disks and NFS: ``flock(LOCK_EX | LOCK_NB)`` on the lease file, held for the writer's
  life. The kernel drops the lock when its holder dies (on NFS the lock manager does, when the
  holder's host stops renewing), so a killed writer never blocks the next one. The file holds
  the holder (host, pid, start time) as JSON and is emptied at release: a non-empty file whose
  lock is free was left by a dead holder, and the next writer records the takeover.
- Object stores (pyarrow / fsspec URIs): the lease object is created with an exclusive create
  (fsspec mode ``"xb"``; a conditional PUT on stores that have one) and holds the holder and an
  expiry. A daemon thread rewrites it every ``ttl / 3`` seconds; a lease past its expiry, or one
  whose holder pid is dead on this very host, is taken over (and recorded).

A held lease is a ``LeaseHeld`` error (a ValueError, one line: the holder and what to do),
raised when the meter is entered, before any training step.
"""
from __future__ import annotations

from ..errors import BadInput

import errno
import json
import os
import socket
import threading
import time
import uuid
import warnings

from .schema import lease_path, writer_name

DEFAULT_TTL_S = 90.0  # object-store leases: expiry after the holder's last heartbeat
MAX_PROCESSES = 1024  # metered processes of one rank under `flopcount run`

# Lease files this process holds (real paths): flock is per open file, but on NFS Linux emulates
# it with POSIX locks, which never conflict inside one process. The one process-wide table.
_HELD_HERE: set[str] = set()
_HELD_LOCK = threading.Lock()


class LeaseHeld(BadInput):
    """Another live writer holds the lease of this (trace dir, rank, process)."""


def holder_info(writer: str, ttl: float | None = None) -> dict:
    now = time.time()
    info = {"writer": writer, "host": socket.gethostname(), "pid": os.getpid(), "started": now,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "nonce": uuid.uuid4().hex}
    if ttl is not None:
        info["expires"] = now + ttl
    return info


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another meter in this process" if holder is None else "an unknown holder"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started_utc', holder.get('started', '?'))}")


def held_message(location: str, rel: str, holder: dict | None) -> str:
    return (f"flopcount: {location} is being written by another meter ({describe_holder(holder)}; lease {rel}): "
            f"one writer per rank and process; wait for it to finish or stop it, or write to another out= directory")


def _parse(data: bytes) -> dict | None:
    """The holder a lease file or object names; None when it is empty (released)."""
    if not data.strip():
        return None
    try:
        holder = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLease:
    """A flock-held lease file (local disks, NFS)."""

    def __init__(self, fd: int, path: str, holder: dict, takeover: dict | None) -> None:
        self.fd, self.path, self.holder, self.takeover = fd, path, holder, takeover

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # emptied: released cleanly, nothing to take over
        except OSError:
            pass
        finally:
            os.close(self.fd)  # drops the lock
            self.fd = None
            with _HELD_LOCK:
                _HELD_HERE.discard(self.path)


class ObjectLease:
    """A lease object with an expiry, kept alive by a heartbeat thread (object stores)."""

    def __init__(self, storage, rel: str, holder: dict, takeover: dict | None, ttl: float) -> None:
        self.storage, self.rel, self.holder, self.takeover, self.ttl = storage, rel, holder, takeover, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="flopcount-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = _parse(self.storage.read(self.rel))
                if not current or current.get("nonce") != self.holder["nonce"]:
                    self.lost = True
                    warnings.warn(f"flopcount: lost the lease {self.storage.describe(self.rel)} (another writer "
                                  "took it over); the trace dir may now have two writers", stacklevel=1)
                    return
                self.holder["expires"] = time.time() + self.ttl
                self.storage.write_atomic(self.rel, json.dumps(self.holder).encode())
            except Exception:  # a heartbeat never breaks training; the next one retries
                continue

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            current = _parse(self.storage.read(self.rel)) if self.storage.exists(self.rel) else None
            if current and current.get("nonce") == self.holder["nonce"]:
                self.storage.remove(self.rel)
        except Exception:
            pass  # an expiring lease frees itself


def acquire(storage, rank: int, process: int = 0, *, ttl: float = DEFAULT_TTL_S):
    """The lease of writer (rank, process) of ``storage``'s trace dir, or LeaseHeld."""
    rel = lease_path(rank, process)
    writer = writer_name(rank, process)
    if hasattr(storage, "path"):
        try:
            return _acquire_file(storage, rel, writer)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # a filesystem without locks: the exclusive-create lease below works on any storage
    return _acquire_object(storage, rel, writer, ttl)


def acquire_first_free(storage, rank: int, *, ttl: float = DEFAULT_TTL_S):
    """(process index, lease) of the first free writer of ``rank``: r00000, r00000-p1, ...
    (``flopcount run``: every metered process of a rank writes as its own writer)."""
    for process in range(MAX_PROCESSES):
        try:
            return process, acquire(storage, rank, process, ttl=ttl)
        except LeaseHeld:
            continue
    raise LeaseHeld(f"flopcount: {storage.describe()}: all {MAX_PROCESSES} writer slots of rank {rank} are held")


def _acquire_file(storage, rel: str, writer: str) -> FileLease:
    import fcntl

    path = os.path.realpath(storage.path(rel))
    with _HELD_LOCK:
        if path in _HELD_HERE:
            raise LeaseHeld(held_message(storage.describe(), rel, None))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _parse(_read_fd(fd))
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LeaseHeld(held_message(storage.describe(), rel, holder)) from None
            raise
        try:
            takeover = _parse(_read_fd(fd))  # left by a holder that died without releasing
            holder = holder_info(writer)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        _HELD_HERE.add(path)
    return FileLease(fd, path, holder, takeover)


def _read_fd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _acquire_object(storage, rel: str, writer: str, ttl: float) -> ObjectLease:
    holder = holder_info(writer, ttl)
    data = json.dumps(holder).encode()
    takeover = None
    if not storage.create_exclusive(rel, data):
        current = _parse(storage.read(rel)) or {}
        if not _abandoned(current):
            raise LeaseHeld(held_message(storage.describe(), rel, current))
        storage.remove(rel)  # expired, or its holder is dead on this host: take it over
        takeover = current
        if not storage.create_exclusive(rel, data):
            raise LeaseHeld(held_message(storage.describe(), rel, _parse(storage.read(rel))))
    if (_parse(storage.read(rel)) or {}).get("nonce") != holder["nonce"]:  # another taker won the race
        raise LeaseHeld(held_message(storage.describe(), rel, _parse(storage.read(rel))))
    return ObjectLease(storage, rel, holder, takeover, ttl)


def _abandoned(holder: dict) -> bool:
    """A lease object nobody keeps alive: past its expiry, unreadable, or its holder's pid is dead on
    this host."""
    if holder.get("unreadable") or not isinstance(holder.get("expires"), (int, float)):
        return True
    if holder["expires"] < time.time():
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def active_holders(storage) -> list[dict]:
    """The live holders of the leases of a trace dir (``flopcount run --out`` refuses a dir that
    another run writes). Probing a lease file takes and drops its lock, and writes nothing."""
    from .schema import LEASE_DIR

    found = []
    for name in storage.listdir(LEASE_DIR):
        if not name.endswith(".lease"):
            continue
        rel = f"{LEASE_DIR}/{name}"
        if hasattr(storage, "path"):
            holder = _probe_file(storage.path(rel))
        else:
            current = _parse(storage.read(rel)) or {}
            holder = None if _abandoned(current) else current
        if holder is not None:
            found.append({**holder, "lease": rel})
    return found


def _probe_file(path: str) -> dict | None:
    import fcntl

    real = os.path.realpath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if real in _HELD_HERE:
            return _parse(_read_fd(fd)) or {}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _parse(_read_fd(fd)) or {}
        return None  # free (the lock is dropped with the fd)
    finally:
        os.close(fd)
