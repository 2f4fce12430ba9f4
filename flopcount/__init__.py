"""flopcount: operator-level FLOP metering for PyTorch fine-tuning, with EU AI Act evidence.

Names other than the meter are imported on first use.
"""
import importlib

from .meter import Meter, meter  # eager: `flopcount.meter` must be the function, not the submodule

__version__ = "0.1.0"

_PUBLIC = {
    "BudgetExceeded": ".budget", "BudgetWarning": ".budget",
    "UncountedOpError": ".capture.counter",
    "Work": ".formulas", "register_formula": ".formulas",
    "summarize": ".summary",
    "read_trace": ".trace.reader",
    "plan": ".planning",
}

__all__ = sorted(_PUBLIC) + ["Meter", "meter", "__version__"]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'flopcount' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
