"""Where trace files live: a local directory, or a pyarrow / fsspec filesystem URI (s3://, gs://, ...).

Local writes are crash safe: temp file in the same directory, fsync, atomic rename, fsync of the
directory. Object stores make a whole object visible at once when its upload completes, so a part
is written directly under its final name there (no rename exists on them).
"""
from __future__ import annotations

import os
import re
import stat

from ..errors import BadInput

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class TraceError(BadInput):
    """Unusable trace input (missing dir, corrupt part, wrong schema version, ...): exit code 2."""


def open_storage(location) -> "LocalStorage | FileSystemStorage":
    location = os.fspath(location)
    if location.startswith("file://"):
        return LocalStorage(location[len("file://"):])
    if _URI.match(location):
        return FileSystemStorage(location)
    return LocalStorage(location)


PROBE = ".flopcount-write-probe"


def check_writable(location) -> None:
    """Raise TraceError (one line naming the path) unless traces can be written at ``location``:
    creates the directory, writes and removes a probe file. Meter.__enter__ (through the writer)
    and `flopcount run` call it before any training step."""
    storage = open_storage(location)
    where = storage.describe()
    if isinstance(storage, LocalStorage) and os.path.exists(storage.root) and not os.path.isdir(storage.root):
        raise TraceError(f"flopcount: cannot write traces to {where}: it is a file, not a directory; "
                         f"choose another out / --out")
    probe = f"{PROBE}-{os.getpid()}"
    try:
        storage.makedirs()
        storage.write_atomic(probe, b"flopcount\n")
        storage.remove(probe)
    except Exception as e:  # OSError (EROFS, EACCES, ENOSPC, ENOTDIR), an object-store error, ...
        raise TraceError(f"flopcount: cannot write traces to {where}: {_reason(e)}; "
                         f"choose a writable out / --out") from None


def _reason(e: Exception) -> str:
    lines = (getattr(e, "strerror", None) or str(e)).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


class LocalStorage:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = root

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def is_dir(self, rel: str = "") -> bool:
        return os.path.isdir(self._abs(rel) if rel else self.root)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._abs(rel))

    def makedirs(self, rel: str = "") -> None:
        os.makedirs(self._abs(rel) if rel else self.root, exist_ok=True)

    def listdir(self, rel: str = "") -> list[str]:
        path = self._abs(rel) if rel else self.root
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def path(self, rel: str) -> str:
        """The local path of ``rel`` (the lease locks it)."""
        return self._abs(rel)

    def is_file(self, rel: str) -> bool:
        """``rel`` is a regular file (not a link, FIFO, device or directory): never opened otherwise."""
        try:
            return stat.S_ISREG(os.lstat(self._abs(rel)).st_mode)
        except OSError:
            return False

    def _regular(self, rel: str) -> str:
        path = self._abs(rel)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise TraceError(f"flopcount: {path} does not exist: run `flopcount verify`") from None
        if not stat.S_ISREG(mode):  # a FIFO would block open(); a link may point outside the trace dir
            raise TraceError(f"flopcount: {path} is not a regular file ({_file_kind(mode)}): a trace holds "
                             "regular files only; remove it or restore the file")
        return path

    def source(self, rel: str):
        """What pyarrow opens to read ``rel`` (a path: pyarrow reads local files directly)."""
        return self._regular(rel)

    def read(self, rel: str) -> bytes:
        with open(self._regular(rel), "rb") as f:
            return f.read()

    def remove(self, rel: str) -> None:
        try:
            os.unlink(self._abs(rel))
        except FileNotFoundError:
            pass

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` unless it exists (O_EXCL); False when it exists."""
        try:
            fd = os.open(self._abs(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def write_atomic(self, rel: str, data: bytes) -> None:
        final = self._abs(rel)
        directory = os.path.dirname(final)
        tmp = f"{final}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:  # e.g. disk full: a partial temp file must not keep the space
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(directory)

    def remove(self, rel: str) -> None:
        os.unlink(self._abs(rel))

    def child(self, name: str) -> "LocalStorage":
        return LocalStorage(os.path.join(self.root, name))

    def describe(self, rel: str = "") -> str:
        return self._abs(rel) if rel else self.location


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileSystemStorage:
    """A pyarrow filesystem (native S3/GCS/HDFS, or any fsspec filesystem through pyarrow's handler)."""

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.location = uri
        self.fsspec = None  # the fsspec filesystem, when pyarrow reaches the store through one
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        except (pa_errors() + (ValueError,)):
            try:
                import fsspec

                fs, path = fsspec.core.url_to_fs(uri)
            except (ImportError, ValueError) as e:
                raise TraceError(f"flopcount: cannot open {uri}: neither pyarrow nor fsspec supports it "
                                 f"({str(e).splitlines()[0][:80]}); install fsspec and the scheme's package") from None
            self.fs, self.root, self.fsspec = pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path, fs
        self.root = self.root.rstrip("/")

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _info(self, rel: str):
        return self.fs.get_file_info(self._abs(rel))

    def is_dir(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.Directory

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type != pafs.FileType.NotFound

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self._abs(rel), recursive=True)

    def listdir(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs

        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._abs(rel), recursive=False))
        return sorted(info.base_name for info in infos)

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self._info(rel).type == pafs.FileType.File

    def _regular(self, rel: str) -> str:
        if not self.is_file(rel):
            what = "does not exist" if not self.exists(rel) else "is not a regular object"
            raise TraceError(f"flopcount: {self.describe(rel)} {what}: run `flopcount verify`")
        return self._abs(rel)

    def source(self, rel: str):
        return self.fs.open_input_file(self._regular(rel))

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._regular(rel)) as f:
            return f.read()

    def remove(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._abs(rel))
        except (FileNotFoundError, OSError):
            pass

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` unless it exists: fsspec's exclusive create (mode "xb": a conditional
        PUT, if-none-match, on stores that have one); False when it exists. A store without it
        gets check-then-write, which two writers starting in the same instant can both pass
        (docs/traces.md, "The lease")."""
        fs = self.fsspec
        if fs is None:
            try:
                import fsspec

                fs = fsspec.core.url_to_fs(self.location)[0]
            except (ImportError, ValueError):
                fs = None
        if fs is not None:
            try:
                with fs.open(self._abs(rel), "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError, TypeError):
                pass  # this backend has no exclusive create
        if self.exists(rel):
            return False
        self.write_atomic(rel, data)
        return True

    def write_atomic(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._abs(rel)) as f:
            f.write(data)

    def remove(self, rel: str) -> None:
        self.fs.delete_file(self._abs(rel))

    def child(self, name: str) -> "FileSystemStorage":
        return FileSystemStorage(f"{self.location.rstrip('/')}/{name}")

    def describe(self, rel: str = "") -> str:
        return f"{self.location.rstrip('/')}/{rel}" if rel else self.location


def pa_errors() -> tuple:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowNotImplementedError)
