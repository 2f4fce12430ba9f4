"""The audit report's content (a JSON-serialisable dict, schema ``flopcount.report/1``).

Renderers (json_report.py, markdown.py, html.py, text.py) only format this dict; the schema is
documented in docs/traces.md.
"""
from __future__ import annotations

import datetime as dt

from ..compliance.thresholds import DEFAULT_APPROACHING, compliance_block, flop_text
from ..errors import findings_first
from ..summary import recorded_base_model, step_series, summarize_traces
from ..trace.integrity import check_integrity
from ..trace.reader import open_traces
from .cop import add_resources

REPORT_SCHEMA = "flopcount.report/1"
TOP_MODULES = 15


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def check_traces(traces, *, base_model=None, base_model_flops=None, systemic_risk=None,
                 approaching: float = DEFAULT_APPROACHING, use_recorded: bool = True) -> tuple[dict, dict]:
    """(summary, threshold check) of opened traces. Names not in the registry raise UnknownBaseModel.

    Without a base model given, the one the runs recorded is used (``use_recorded=False``: none,
    so the unknown-compute threshold applies)."""
    summary = summarize_traces(traces)
    if base_model is None and base_model_flops is None and use_recorded:
        base_model, base_model_flops = recorded_base_model(traces)
    result = compliance_block(summary["training_flops"], base_model, base_model_flops, systemic_risk, approaching)
    return summary, result


def _runs(traces) -> list[dict]:
    runs = []
    for trace in traces.traces:
        for run_id in trace.run_ids:
            segments = [s for s in trace.segments if s["run_id"] == run_id]
            parts = [e for entries in trace.manifests.values() for e in entries if e["type"] == "part"]
            runs.append({
                "run_id": run_id, "dir": trace.storage.describe(),
                "ranks": sorted({s["rank"] for s in segments}),
                "world_size": max(s.get("world_size", 1) for s in segments),
                "segments": len({s["segment"] for s in segments}),
                "first_step": min((p["first_step"] for p in parts), default=None),
                "last_step": max((p["last_step"] for p in parts), default=None),
                "started": _iso(min(s["started"] for s in segments)),
                "manifest_digest": trace.digest,
            })
    return runs


def integrity_block(integrity) -> dict:
    """The report's ``integrity``: a check_integrity result (the check `flopcount verify` makes) as a dict."""
    return {**integrity.as_dict(), "parts_checked": integrity.parts_checked, "notes": list(integrity.notes)}


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
            "world_size": summary["world_size"], "start_time": _iso(summary["start_time"]),
            "end_time": _iso(summary["end_time"]),
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
    total, points = 0, []
    for index, (run_id, step, flops) in enumerate(series):
        total += flops
        points.append([index, run_id, step, total])
    if len(points) > max_points:
        stride = -(-len(points) // max_points)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points
