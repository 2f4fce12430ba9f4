"""Audit reports: build.py makes the report dict; one renderer per format (RENDERERS); text.py for terminals.

``build_report`` and ``compliance_text`` (which read traces with pyarrow) are imported on first
use, so that listing the formats (the CLI's --help) stays cheap.
"""
import importlib

from .html import render_html
from .json_report import render_json
from .markdown import render_markdown

# format name -> renderer(report dict) -> str. A new form is one entry here.
RENDERERS = {"json": render_json, "md": render_markdown, "html": render_html}

_LAZY = {"REPORT_SCHEMA": ".build", "build_report": ".build", "compliance_text": ".text"}

__all__ = ["REPORT_SCHEMA", "RENDERERS", "build_report", "compliance_text"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flopcount.report' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
