"""Text taken from a trace (run ids, module and op names, base models, hosts, file names) made
inert for each output: Markdown, and terminals. (HTML uses html.escape; JSON escapes itself.)"""
from __future__ import annotations

import re

from ..errors import printable

__all__ = ["markdown_text", "printable"]

# Markdown's inline syntax (emphasis, code, links and images, tables, strikethrough) and the escape
# character itself; a backslash before ASCII punctuation is always a literal in CommonMark.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}  # raw HTML passes through Markdown renderers


def markdown_text(value) -> str:
    """``value`` as literal text inside a Markdown paragraph, list item or table cell."""
    text = printable(" ".join(str(value).splitlines()))
    text = "".join(_HTML.get(c, c) for c in text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)
