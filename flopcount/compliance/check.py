"""The threshold check of opened traces: their summary and its status against the threshold, the
one computation behind `flopcount check`, `estimate`, `report` and the Code of Practice form (the
report only renders its result)."""
from __future__ import annotations

from ..summary import recorded_base_model, summarize_traces
from .thresholds import DEFAULT_APPROACHING, compliance_block


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
