"""flopcount's exceptions: one base, ``FlopcountError``, and one subclass per kind of problem.
``cli.main`` maps them to exit codes by type only (``EXIT_CODES``); any other exception is a bug
and keeps its traceback.

- ``BadInput`` (a ValueError): input flopcount cannot use (a missing or empty dir, a malformed
  manifest or Parquet part, an unknown schema version or base model, a bad flag or option value):
  exit 2, one line naming the file or value. ``TraceError`` (trace input), UnknownBaseModel and
  the CLI's InputError derive from it and stay importable where they always were.
- ``IntegrityError``: the evidence does not verify (exit 1).
- ``UncountedOpError`` (a RuntimeError): strict mode met an op with neither a formula nor a
  known-zero entry. Asked for by the user, so it reaches the training loop.
- ``NativeUnavailable`` (a RuntimeError): backend='native' asked for where the extension is not
  available. ``NativeContractError``, one of them: the native extension writes another key layout than
  the decoder reads (KEY_VERSION); backend='native' raises it at Meter.__enter__, 'auto' falls
  back to the dispatch backend with a warning saying so.
- ``BudgetExceeded`` (a RuntimeError): the next step would cross the compute budget. Asked for,
  so it reaches the training loop. Both stay importable from capture/counter.py and budget.py.

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


class TraceError(BadInput):
    """Unusable trace input (missing dir, corrupt part, wrong schema version, ...): exit code 2."""


class DuplicateFormula(BadInput):
    """An op that already has a formula (or a known-zero entry) was registered again without
    ``override=True`` (formulas/registry.py)."""


class NativeUnavailable(FlopcountError, RuntimeError):
    """backend='native' was asked for where the native extension is not available (the message
    says why: not built, disabled, torch too old, refused)."""


class NativeContractError(NativeUnavailable):
    """The native extension's key layout (KEY_VERSION) is not the one flopcount's decoder reads
    (capture/native/decode.py): it is refused when it loads, never misread."""


class UncountedOpError(FlopcountError, RuntimeError):
    """Raised in strict mode for an op with neither a formula nor a known-zero entry."""


class BudgetExceeded(FlopcountError, RuntimeError):
    """Raised by ``Meter.step()`` / ``optimizer.step()`` when the next step would cross the budget.

    The traces are flushed before it is raised. ``total`` (training FLOPs so far, all ranks),
    ``forecast`` (the next step's) and ``limit`` (the budget) say why."""

    def __init__(self, message: str, *, total: int, forecast: int, limit: float, step: int) -> None:
        super().__init__(message)
        self.total, self.forecast, self.limit, self.step = total, forecast, limit, step


# The command line's exit code of each kind (the most specific class listed wins; README "Exit codes").
EXIT_CODES: dict[type, int] = {IntegrityError: 1, BadInput: 2}


def exit_code(error: BaseException) -> int | None:
    """The exit code ``cli.main`` gives ``error``; None for an exception it does not map (a bug)."""
    return next((EXIT_CODES[cls] for cls in type(error).__mro__ if cls in EXIT_CODES), None)


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
        if integrity.verified or not isinstance(e, TraceError):  # a bad flag stays bad input
            raise
        raise IntegrityError(f"{one_line(e)} ({location} does not verify: {len(integrity.problems)} problem(s))",
                             integrity.problems) from None
