"""flopcount's exceptions, by what the command line does with them (cli.main maps them to exit codes).

- ``BadInput`` (a ValueError): input flopcount cannot use (a missing or empty dir, a malformed
  manifest or Parquet part, an unknown schema version or base model, a bad flag value): exit 2,
  one line naming the file or value. TraceError, UnknownBaseModel and the CLI's InputError derive
  from it and stay importable where they always were.
- ``IntegrityError``: the evidence does not verify (exit 1).

Every message is one line that starts with "flopcount: " and says what to do.
"""
from __future__ import annotations

import contextlib


class FlopcountError(Exception):
    """Base class of flopcount's own errors."""


class BadInput(FlopcountError, ValueError):
    """Input flopcount cannot use: exit code 2."""


class IntegrityError(FlopcountError):
    """The traces do not verify: exit code 1. ``problems``: the integrity check's findings."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


def printable(text) -> str:
    """``text`` with every control character (a newline, a terminal escape) written as its Python
    escape: a run id or file name taken from a trace cannot break a line or drive the terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(error: BaseException) -> str:
    """The error's message as one printable line with the ``flopcount: `` prefix."""
    message = printable(" ".join(str(error).split("\n")).strip()) or type(error).__name__
    return message if message.startswith("flopcount") else f"flopcount: {message}"


@contextlib.contextmanager
def findings_first(integrity, location: str):
    """Reading traces that do not verify: an unreadable part (a missing or rewritten one) is part
    of the integrity finding (exit 1, as `flopcount verify` says), not bad input (exit 2).
    ``integrity``: the check_integrity result of the traces being read."""
    try:
        yield
    except BadInput as e:
        from .trace.storage import TraceError

        if integrity.verified or not isinstance(e, TraceError):  # a bad flag stays bad input
            raise
        raise IntegrityError(f"{one_line(e)} ({location} does not verify: {len(integrity.problems)} problem(s))",
                             integrity.problems) from None
