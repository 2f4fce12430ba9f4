"""How ops are seen: dispatch (TorchDispatchMode), native (C++ observer), compile (graphs)."""
from .counter import Counter, UncountedOpError

__all__ = ["Counter", "UncountedOpError"]
