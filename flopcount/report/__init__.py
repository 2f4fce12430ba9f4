"""Audit reports: build.py makes the report dict; one renderer per format (RENDERERS); text.py for terminals."""
from .build import REPORT_SCHEMA, build_report
from .html import render_html
from .json_report import render_json
from .markdown import render_markdown
from .text import compliance_text

# format name -> renderer(report dict) -> str. A new form is one entry here.
RENDERERS = {"json": render_json, "md": render_markdown, "html": render_html}

__all__ = ["REPORT_SCHEMA", "RENDERERS", "build_report", "compliance_text"]
