"""Progress bars for long reads (summaries and reports over many trace parts).

A bar appears only when stderr is a terminal, the work has at least ``MIN_ITEMS`` items and tqdm
is installed; FLOPCOUNT_PROGRESS=0 switches bars off. Output that goes to a file or a pipe never
has one.
"""
from __future__ import annotations

import os
import sys

MIN_ITEMS = 16


def wants_bar(total: int, stream=None, environ=None) -> bool:
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    if total < MIN_ITEMS or environ.get("FLOPCOUNT_PROGRESS", "1") == "0":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(items, desc: str, unit: str = "part"):
    """``items`` (a sized iterable), wrapped in a tqdm bar when ``wants_bar``."""
    if not wants_bar(len(items)):
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr)
