"""flopcount: operator-level FLOP metering for PyTorch fine-tuning, with EU AI Act evidence.

Every public name is imported on first use, so ``import flopcount`` and the analysis commands
(verify, summarize, check, estimate, report, models) never import torch: an auditor's machine
needs no PyTorch. Only the meter needs it (``flopcount.meter`` says how to install it).
"""
import importlib
import sys
import types

__version__ = "0.1.0"

_PUBLIC = {
    "Meter": ".meter", "meter": ".meter",
    "BudgetExceeded": ".budget", "BudgetWarning": ".budget",
    "UncountedOpError": ".capture.counter",
    "Work": ".formulas", "register_formula": ".formulas",
    "summarize": ".summary",
    "read_trace": ".trace.reader",
    "plan": ".planning",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


class _Package(types.ModuleType):
    """This package's module type: a public name that shares its submodule's name (``meter``)
    stays the public object when the import system binds the submodule ``flopcount.meter``."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == f".{name}":
            return  # `import flopcount.meter` binding the submodule: the function keeps the name
        super().__setattr__(name, value)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'flopcount' has no attribute {name!r}")
    if module == ".meter":
        from ._torch import require_torch

        require_torch()
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


sys.modules[__name__].__class__ = _Package
