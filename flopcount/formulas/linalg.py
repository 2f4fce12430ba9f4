"""Linear-algebra solvers (category ``other``: a triangular solve is a dependent sweep, not a
tensor-core GEMM, and torch's FlopCounterMode does not count it either).

``linalg_solve_triangular(A [*, n, n], B, upper, left, unitriangular)``: substitution computes, per
right-hand side, n(n-1)/2 multiply-adds (n(n-1) FLOP) and n divisions (none when the diagonal is
unit): n² FLOP per column of B (left=True, B [*, n, k]) or per row (left=False, B [*, m, n]).
"""
from __future__ import annotations

import math

import torch

from .registry import formula

aten = torch.ops.aten


def triangular_solve_flops(batch: int, n: int, rhs: int, unitriangular: bool) -> int:
    return batch * rhs * (n * (n - 1) + (0 if unitriangular else n))


@formula(aten.linalg_solve_triangular, "other")
def linalg_solve_triangular(a_shape, b_shape, *, out_shape=None, upper=None, left=True, unitriangular=False,
                            **kwargs) -> int:
    n = a_shape[-1]
    batch = math.prod((out_shape or b_shape)[:-2])
    rhs = b_shape[-1] if left else b_shape[-2]
    return triangular_solve_flops(batch, n, rhs, bool(unitriangular))
