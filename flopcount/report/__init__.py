"""Audit reports: build.py makes the report dict; one renderer per format (RENDERERS, renderers.py);
text.py for terminals; format.py for the number, date and table-cell formats every output shares.

Everything is imported on first use: ``build_report`` and ``compliance_text`` read traces with
pyarrow, and ``report.format`` is imported by modules below the report (compliance, the budget)
that must not load the renderers with it.
"""
import importlib

_LAZY = {"REPORT_SCHEMA": ".build", "build_report": ".build", "compliance_text": ".text", "RENDERERS": ".renderers"}

__all__ = ["REPORT_SCHEMA", "RENDERERS", "build_report", "compliance_text"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flopcount.report' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
