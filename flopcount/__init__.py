"""flopcount: operator-level FLOP metering for PyTorch fine-tuning, with EU AI Act evidence."""
from .capture.counter import UncountedOpError
from .formulas import Work, register_formula
from .meter import Meter, meter

__version__ = "0.1.0"

__all__ = ["Meter", "UncountedOpError", "Work", "meter", "register_formula", "__version__"]
