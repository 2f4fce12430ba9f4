"""The native capture backend: a C++ RecordFunction observer (csrc/) with no Python per op.

Three modules by concern:

- ``builder.py``: the source, the build cache keyed by everything that changes the binary (a
  private directory renamed into place), loading with a bounded wait (FLOPCOUNT_NATIVE_WAIT,
  default 10 s; then the meter goes on without it), `flopcount info` (``describe``) and
  `flopcount build-native` (``build``). Set FLOPCOUNT_NATIVE=0 to never build or load it.
- ``capture.py``: ``NativeCapture``, the Capture backend that turns the observer on, mirrors the
  Python-held context in C++ (module, gradient and backward hooks) and books what it aggregated.
- ``decode.py``: the extension's key format (tags, as in csrc/) decoded back into op arguments.

This package holds the one per-process cache of the loaded extension (``load`` /
``load_error``); its modules read it from here at use.
"""
from __future__ import annotations

import functools

from .builder import BUILD_FLAGS, EXTENSION, MIN_TORCH, SOURCE_NAME, build_state, cache_dir, describe, extension
from .builder import build_now as build
from .builder import source_path
from .capture import COLLECTIVE, FORMULA, FORMULA_VALUES, REPEATED_KEPT, UNCOUNTED, ZERO, NativeCapture
from .decode import (BOOL, BOOL_LIST, DOUBLE, DOUBLE_LIST, DTYPE, INT, INT_LIST, LIST, NONE, OPAQUE, OUTPUTS,
                     PENDING_VALUES, STRING, TENSOR, TENSOR_DTYPE, VALUES)

__all__ = ["BUILD_FLAGS", "EXTENSION", "MIN_TORCH", "SOURCE_NAME", "NativeCapture", "build", "build_state",
           "cache_dir", "describe", "load", "load_error", "source_path",
           "BOOL", "BOOL_LIST", "DOUBLE", "DOUBLE_LIST", "DTYPE", "INT", "INT_LIST", "LIST", "NONE", "OPAQUE",
           "OUTPUTS", "PENDING_VALUES", "STRING", "TENSOR", "TENSOR_DTYPE", "VALUES",
           "COLLECTIVE", "FORMULA", "FORMULA_VALUES", "REPEATED_KEPT", "UNCOUNTED", "ZERO"]


@functools.lru_cache(maxsize=1)
def _load():
    """(extension module, None) or (None, why it is not available), once per process
    (builder.extension: waits for a build at most FLOPCOUNT_NATIVE_WAIT seconds)."""
    return extension()


def load():
    """The extension module, or None when it is not available (yet) here."""
    return _load()[0]


def load_error() -> str | None:
    """None when the extension loads, else one line saying why not."""
    return _load()[1]
