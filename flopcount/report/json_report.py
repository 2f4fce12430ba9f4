"""The report as JSON (schema ``flopcount.report/1``, documented in docs/traces.md)."""
from __future__ import annotations

import json


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"
