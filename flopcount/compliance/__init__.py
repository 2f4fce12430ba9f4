"""EU AI Act compliance: thresholds, the base-model registry, forecasts and the method statement."""
from .method import hardware_description, method_statement
from .registry import BaseModel, UnknownBaseModel, base_models, lookup
from ..report.format import sig2
from .thresholds import compliance_block, summary_compliance

__all__ = ["BaseModel", "UnknownBaseModel", "add_method_and_compliance", "base_models", "compliance_block",
           "lookup", "sig2"]


def add_method_and_compliance(summary: dict, *, base_model=None, base_model_flops=None, hardware=None) -> dict:
    """Add the ``method`` statement, and the ``compliance`` check when a base model is known, to a summary."""
    from .. import __version__

    hardware = hardware if hardware is not None else hardware_description()
    summary["method"] = method_statement(summary, flopcount_version=__version__, hardware=hardware)
    if base_model is not None or base_model_flops is not None:
        summary["compliance"] = summary_compliance(summary["training_flops"], base_model, base_model_flops)
    return summary
