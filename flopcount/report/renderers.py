"""The audit report's renderers, by format name: `flopcount report --format`. A new form is one entry here."""
from .html import render_html
from .json_report import render_json
from .markdown import render_markdown

# format name -> renderer(report dict) -> str
RENDERERS = {"json": render_json, "md": render_markdown, "html": render_html}
