"""The report as one self-contained HTML file, with the plot embedded as a PNG data URI."""
from __future__ import annotations

import base64
from html import escape as _escape

from .escape import printable
from .plot import cumulative_plot_png
from .sections import sections

STYLE = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}dt{font-weight:600;margin-top:.4em}dd{margin-left:1.5em}
.status-below{color:#1b7f3a}.status-approaching{color:#b36b00}.status-exceeds{color:#b22222}"""


def escape(value) -> str:
    """Text for HTML: entities for markup, control characters written out (report/escape.py)."""
    return _escape(printable(value))


def render_html(report: dict) -> str:
    status = report["compliance"]["status"]
    body = [f"<h1>flopcount audit report: {escape(report['project']['location'])}</h1>",
            f"<p>Generated {escape(report['generated_at'])} by flopcount {escape(report['tool']['flopcount_version'])} "
            f"(report schema {escape(report['schema'])}). Status: "
            f"<strong class=\"status-{status}\">{escape(status)}</strong></p>"]
    for title, kind, content in sections(report):
        body.append(f"<h2>{escape(title)}</h2>")
        if kind == "fields":
            body.append("<dl>" + "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in content)
                        + "</dl>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{escape(str(item))}</li>" for item in content) + "</ul>")
        else:
            header, rows = content
            body.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
                        + "</table>")
        if title == "Result":
            png = cumulative_plot_png(report)
            if png:
                body.append(f'<img alt="cumulative training FLOP against the threshold" '
                            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>flopcount audit report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
