"""Formula families; importing this package fills the one registry (registry.REGISTRY).

Third-party libraries have one file each and register by qualified op name, importing nothing
from the library (registry.py): they cost nothing when the library is absent."""
from . import attention, conv, matmul, norm, optim, pointwise, zero  # noqa: F401  (registration)
from . import bitsandbytes, flash_attn  # noqa: F401  (third-party libraries, by op name)
from .registry import KNOWN_ZERO, REGISTRY, Formula, Work, known_zero, op_name, register_formula

__all__ = ["KNOWN_ZERO", "REGISTRY", "Formula", "Work", "known_zero", "op_name", "register_formula"]
