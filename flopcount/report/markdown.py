"""The report as Markdown, with the cumulative-compute plot embedded as a PNG data URI."""
from __future__ import annotations

import base64

from .escape import markdown_text as _cell
from .plot import cumulative_plot_png
from .sections import sections


def render_markdown(report: dict) -> str:
    lines = [f"# flopcount audit report: {_cell(report['project']['location'])}", "",
             f"Generated {report['generated_at']} by flopcount {report['tool']['flopcount_version']} "
             f"(report schema {report['schema']}).", ""]
    for title, kind, content in sections(report):
        lines += [f"## {title}", ""]
        if kind == "fields":
            lines += [f"- **{label}**: {_cell(value)}" for label, value in content]
        elif kind == "list":
            lines += [f"- {_cell(item)}" for item in content]
        else:
            header, rows = content
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        lines.append("")
        if title == "Result":
            png = cumulative_plot_png(report)
            if png:
                lines += ["![cumulative training FLOP against the threshold]"
                          f"(data:image/png;base64,{base64.b64encode(png).decode()})", ""]
    return "\n".join(lines)
