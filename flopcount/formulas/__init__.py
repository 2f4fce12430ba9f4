"""Formula families; importing this package fills the one registry (registry.REGISTRY)."""
from . import attention, conv, matmul, norm, optim, pointwise, zero  # noqa: F401  (registration)
from .registry import KNOWN_ZERO, REGISTRY, Formula, Work, known_zero, op_name, register_formula

__all__ = ["KNOWN_ZERO", "REGISTRY", "Formula", "Work", "known_zero", "op_name", "register_formula"]
