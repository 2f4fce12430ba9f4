"""The audit report's content (a JSON-serialisable dict, schema ``flopcount.report/1``).

Renderers (json_report.py, markdown.py, html.py, text.py) only format this dict; the schema is
documented in docs/traces.md.
"""
from __future__ import annotations

import datetime as dt

from ..compliance.check import check_traces
from ..compliance.thresholds import DEFAULT_APPROACHING
from ..errors import findings_first
from ..exact import running_sums
from ..summary import step_series
from ..trace import manifest as mf
from ..trace.integrity import check_integrity
from ..trace.reader import open_traces
from .checks import integrity_block
from .cop import add_resources
from .format import flop_text, iso_time

REPORT_SCHEMA = "flopcount.report/1"
TOP_MODULES = 15


def _runs(traces) -> list[dict]:
    runs = []
    for trace in traces.traces:
        for run_id in trace.run_ids:
            segments = [s for s in trace.segments if s["run_id"] == run_id]
            # Parts that hold a step: a part of only a trailing row holds none (its next_step is its own number).
            parts = [e for entries in trace.manifests.values() for e in entries
                     if e["type"] == "part" and mf.next_step(e) > e["first_step"]]
            runs.append({
                "run_id": run_id, "dir": trace.storage.describe(),
                "ranks": sorted({s["rank"] for s in segments}),
                "world_size": max(s.get("world_size", 1) for s in segments),
                "segments": len({s["segment"] for s in segments}),
                "first_step": min((p["first_step"] for p in parts), default=None),
                "last_step": max((mf.next_step(p) - 1 for p in parts), default=None),  # not a trailing row's number
                "started": iso_time(min(s["started"] for s in segments)),
                "manifest_digest": trace.digest,
            })
    return runs


def build_report(location, *, base_model=None, base_model_flops=None, systemic_risk=None,
                 approaching: float = DEFAULT_APPROACHING, use_recorded: bool = True,
                 planned_steps: int | None = None, planned_tokens: int | None = None, dtype: str | None = None,
                 utilisation: float | None = None, digest: str | None = None, public_key=None,
                 ledger=None) -> dict:
    """Everything the audit report says about the traces at ``location``. A plan (``planned_steps``
    or ``planned_tokens``) gives the forecast notification timing; ``dtype`` / ``utilisation`` set
    the hardware cross-check (report/cop.py); ``digest`` / ``public_key`` / ``ledger`` are the
    options of the integrity check (trace/integrity.py)."""
    from .. import __version__

    traces = open_traces(location)
    integrity = check_integrity(traces, digest=digest, public_key=public_key, ledger=ledger)
    with findings_first(integrity, traces.location):
        summary, result = check_traces(traces, base_model=base_model, base_model_flops=base_model_flops,
                                       systemic_risk=systemic_risk, approaching=approaching,
                                       use_recorded=use_recorded)
        add_resources(traces, summary, result, planned_steps=planned_steps, planned_tokens=planned_tokens,
                      dtype=dtype, utilisation=utilisation, approaching=approaching)  # notification, cross-check
        series = step_series(traces)
    modules = summary["by_module"]
    return {
        "schema": REPORT_SCHEMA,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"flopcount_version": __version__, "torch_version": summary["torch_version"]},
        "project": {"location": traces.location, "runs": _runs(traces)},
        "totals": {
            "training_flops": summary["training_flops"], "hardware_flops": summary["hardware_flops"],
            "excluded_flops": summary["method"]["excluded_flops"],
            "steps": summary["steps"], "tokens": summary["tokens"], "samples": summary["samples"],
            "world_size": summary["world_size"], "start_time": iso_time(summary["start_time"]),
            "end_time": iso_time(summary["end_time"]),
            "text": {"training_flops": flop_text(summary["training_flops"]),
                     "hardware_flops": flop_text(summary["hardware_flops"])},
            "time": summary["time"], "energy": summary["energy"], "hardware_estimate": summary["hardware_estimate"],
        },
        "compliance": result,
        "breakdowns": {
            "by_phase": summary["by_phase"], "by_category": summary["by_category"],
            "training_by_category": summary["training_by_category"],
            "top_modules": [{"module": name, "flops": flops,
                             "training_flops": summary["by_module_training"].get(name, 0)}
                            for name, flops in list(modules.items())[:TOP_MODULES]],
        },
        "method": summary["method"],
        "integrity": integrity_block(integrity),
        "series": {"cumulative_training_flops": _cumulative(series)},
    }


def _cumulative(series, max_points: int = 2000) -> list[list]:
    """[[index, run_id, step, cumulative training FLOPs]] over the project's steps, thinned for plots."""
    totals = running_sums(flops for _, _, flops in series)
    points = [[index, run_id, step, total] for index, ((run_id, step, _), total) in enumerate(zip(series, totals))]
    if len(points) > max_points:
        stride = -(-len(points) // max_points)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points
