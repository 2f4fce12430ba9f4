"""How ops are seen, behind one Capture protocol (protocol.py): dispatch (TorchDispatchMode), native
(C++ observer), compile (graphs); active.py holds the process-wide registries."""
from .counter import Counter, UncountedOpError

__all__ = ["Counter", "UncountedOpError"]
