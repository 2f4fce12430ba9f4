"""Matrix products: 2 FLOP per multiply-add; bias/accumulate adds are pointwise work."""
from __future__ import annotations

import torch

from .registry import Work, formula

aten = torch.ops.aten


def mm_flops(m: int, k: int, n: int, batch: int = 1) -> int:
    return 2 * batch * m * k * n


@formula(aten.mm, "matmul")
def mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (m, k), (_, n) = a_shape, b_shape
    return mm_flops(m, k, n)


@formula([aten.addmm, aten.addmm_], "matmul")
def addmm(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> list[Work]:
    (m, k), (_, n) = a_shape, b_shape
    return [Work("matmul", mm_flops(m, k, n)), Work("pointwise", m * n)]


@formula(aten.linear, "matmul")
def linear(x_shape, w_shape, bias_shape=None, *args, out_shape=None, **kwargs) -> list[Work]:
    """Seen as one op only under torch.inference_mode (elsewhere it reaches capture as its
    mm/addmm): x [..., k] times w^T [k, n], plus the bias add."""
    m = 1
    for d in x_shape[:-1]:
        m *= d
    n, k = w_shape
    work = [Work("matmul", mm_flops(m, k, n))]
    if bias_shape is not None:
        work.append(Work("pointwise", m * n))
    return work


@formula(aten.bmm, "matmul")
def bmm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (b, m, k), (_, _, n) = a_shape, b_shape
    return mm_flops(m, k, n, batch=b)


@formula([aten.baddbmm, aten.baddbmm_], "matmul")
def baddbmm(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> list[Work]:
    (b, m, k), (_, _, n) = a_shape, b_shape
    return [Work("matmul", mm_flops(m, k, n, batch=b)), Work("pointwise", b * m * n)]


@formula([aten._scaled_mm], "matmul")
def scaled_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    (m, k), (_, n) = a_shape, b_shape
    return mm_flops(m, k, n)


def _offsets_total(offs) -> int | None:
    # Meta offsets (flopcount plan) have no values: the groups cover every row, as the MoE layers
    # that route all top-k token slots through one grouped GEMM do.
    if offs is None or offs.is_meta:
        return None
    return int(offs[-1]) if offs.numel() else 0


@formula([aten._grouped_mm, aten._scaled_grouped_mm], "matmul", needs_values=True)
def grouped_mm(mat_a, mat_b, *args, out=None, **kwargs) -> int:
    """MoE grouped GEMM. With offsets, only the rows (or K slices) the groups cover are computed.

    2-D x 3-D: rows of A are split into groups, each multiplied by its own [K, N] matrix;
    3-D x 3-D: a plain batched product; 2-D x 2-D: K is split into groups (weight gradients);
    3-D x 2-D: columns of B are split into groups.
    """
    offs = kwargs.get("offs")
    if offs is None:
        offs = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() == 1
                     and not a.is_floating_point()), None)
    covered = _offsets_total(offs)
    a, b = tuple(mat_a.shape), tuple(mat_b.shape)
    if len(a) == 2 and len(b) == 3:
        rows = a[0] if covered is None else covered
        return mm_flops(rows, a[1], b[2])
    if len(a) == 3 and len(b) == 3:
        return mm_flops(a[1], a[2], b[2], batch=a[0])
    if len(a) == 2 and len(b) == 2:
        k = a[1] if covered is None else covered
        return mm_flops(a[0], k, b[1])
    if len(a) == 3 and len(b) == 2:
        cols = b[1] if covered is None else covered
        return mm_flops(a[1], a[2], cols)
    raise ValueError(f"_grouped_mm with operand shapes {a} x {b}")

