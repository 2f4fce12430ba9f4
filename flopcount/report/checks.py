"""The threshold check and the integrity check of opened traces, as the report blocks that the
audit report (build.py) and the Code of Practice form (cop.py) both carry."""
from __future__ import annotations

from ..compliance.thresholds import DEFAULT_APPROACHING, compliance_block
from ..summary import recorded_base_model, summarize_traces


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


def integrity_block(integrity) -> dict:
    """The report's ``integrity``: a check_integrity result (the check `flopcount verify` makes) as a dict."""
    return {**integrity.as_dict(), "parts_checked": integrity.parts_checked, "notes": list(integrity.notes)}


def integrity_fields(integrity: dict) -> list[tuple[str, str]]:
    """The integrity check's result (trace/integrity.py): "verified" only when it is."""
    return [
        ("verified", "yes" if integrity["verified"] else "NO"),
        ("parts checked", str(integrity["parts_checked"])),
        ("signed by", integrity["signed_by"] or "no signature checked against a key"),
        ("trace digest", integrity["digest"] or "-"),
        *[("note", n) for n in integrity.get("notes", [])],
        *[("problem", p) for p in integrity["problems"]],
    ]
