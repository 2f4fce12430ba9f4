"""The native capture backend: a C++ capture (csrc/: a dispatch key's fallback, or a RecordFunction
observer) with no Python per op.

Three modules by concern:

- ``builder.py``: the source, the build cache keyed by everything that changes the binary (a
  private directory renamed into place), loading with a bounded wait (FLOPCOUNT_NATIVE_WAIT,
  default 10 s; then the meter goes on without it), `flopcount info` (``describe``) and
  `flopcount build-native` (``build``). Set FLOPCOUNT_NATIVE=0 to never build or load it.
- ``capture.py``: ``NativeCapture``, the Capture backend that turns the observer on, mirrors the
  Python-held context in C++ (module, gradient and backward hooks) and books what it aggregated.
- ``decode.py``: the extension's keys decoded back into op arguments, with the extension's own
  tag enum, and the check of its KEY_VERSION when it loads.

This package holds the one per-process cache of the loaded extension (``load`` /
``load_error``); its modules read it from here at use.
"""
from __future__ import annotations

import functools

from ...errors import NativeContractError
from .builder import BUILD_FLAGS, EXTENSION, HEADERS, MIN_TORCH, SOURCES, build_state, cache_dir, describe, extension
from .builder import build_now as build
from .builder import source_path
from .capture import REPEATED_KEPT, NativeCapture, classify
from .decode import KEY_VERSION, check_key_version

__all__ = ["BUILD_FLAGS", "EXTENSION", "HEADERS", "KEY_VERSION", "MIN_TORCH", "SOURCES", "NativeCapture", "build",
           "build_state", "cache_dir", "check_key_version", "classify", "describe", "load", "load_error",
           "source_path", "REPEATED_KEPT"]


@functools.lru_cache(maxsize=1)
def _load():
    """(extension module, None) or (None, why it is not available), once per process
    (builder.extension: waits for a build at most FLOPCOUNT_NATIVE_WAIT seconds). An extension
    whose KEY_VERSION the decoder does not read is refused here, never misread."""
    lib, why = extension()
    if lib is not None:
        try:
            check_key_version(lib)
        except NativeContractError as exc:
            return None, str(exc).removeprefix("flopcount: ")
    return lib, why


def load():
    """The extension module, or None when it is not available (yet) here."""
    return _load()[0]


def load_error() -> str | None:
    """None when the extension loads, else one line saying why not."""
    return _load()[1]
