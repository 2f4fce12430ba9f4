"""Trace writer (placeholder until the trace issue lands): in-memory meters only."""
from __future__ import annotations


def open_writer(meter):
    """A writer for ``meter.out`` with ``write(record)`` and ``close(summary)``, or None."""
    return None
