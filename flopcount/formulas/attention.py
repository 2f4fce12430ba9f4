"""Fused attention kernels (SDPA flash / efficient / cuDNN / CPU flash / varlen / overrideable).

Forward GEMM work = 2 * P * (D_qk + D_v), summed over batch and query heads, where P is the
number of (query, key) pairs the kernel computes (design: counting conventions):
  - no mask: Sq * Sk;  an arbitrary attn_mask / bias tensor: Sq * Sk;
  - is_causal: top-left aligned, sum over i < Sq of min(i + 1, Sk);
  - efficient attention's custom_mask_type 2 is bottom-right aligned;
  - flash sliding windows: only the pairs inside the window;
  - varlen / packed sequences: the sum over the sequences given by the cumulative offsets.
Softmax: attention_softmax_forward FLOP per pair, in `pointwise`.
Backward = 2x the forward GEMM work (dQ, dK, dV, dP) in the op's phase, plus the recomputed
score product Q K^T (2 * P * D_qk, which is 0.5x forward when D_qk = D_v) and softmax
(attention_softmax_forward per pair) in phase `recompute`, plus the softmax gradient.
GQA/MQA: K and V have fewer heads than Q; the work is per *query* head.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..conventions import RECOMPUTE
from .constants import PER_ELEMENT
from .registry import Work, formula

aten = torch.ops.aten

SOFTMAX_FWD = PER_ELEMENT["attention_softmax_forward"].flops
SOFTMAX_BWD = PER_ELEMENT["attention_softmax_backward"].flops


def causal_pairs(sq: int, sk: int) -> int:
    """Pairs under a top-left aligned causal mask: sum over i < sq of min(i + 1, sk)."""
    n = min(sq, sk)
    return n * (n + 1) // 2 + max(sq - sk, 0) * sk


def window_pairs(sq: int, sk: int, left: int, right: int, offset: int = 0) -> int:
    """Pairs (i, j) with j in [i + offset - left, i + offset + right] and 0 <= j < sk.

    left/right < 0 mean unbounded; causal attention is right = 0. offset = sk - sq aligns the
    window bottom-right (as flash attention does for is_causal with sq != sk)."""
    rows = np.arange(sq, dtype=np.int64) + offset
    hi = np.minimum(sk - 1, rows + right) if right >= 0 else np.full(sq, sk - 1)
    lo = np.maximum(0, rows - left) if left >= 0 else np.zeros(sq, dtype=np.int64)
    return int(np.clip(hi - lo + 1, 0, None).sum())


class Geometry(NamedTuple):
    pairs: int  # summed over batch, query heads and sequences
    d_qk: int
    d_v: int


def forward_work(g: Geometry) -> list[Work]:
    return [Work("attention", 2 * g.pairs * (g.d_qk + g.d_v)),
            Work("pointwise", SOFTMAX_FWD * g.pairs)]


def backward_work(g: Geometry) -> list[Work]:
    return [Work("attention", 4 * g.pairs * (g.d_qk + g.d_v)),
            Work("pointwise", SOFTMAX_BWD * g.pairs),
            Work("attention", 2 * g.pairs * g.d_qk, RECOMPUTE),
            Work("pointwise", SOFTMAX_FWD * g.pairs, RECOMPUTE)]


def _lengths(offsets) -> list[int]:
    values = offsets.tolist()
    return [b - a for a, b in zip(values[:-1], values[1:])]


def geometry(q, k, v, *, layout: str, causal: bool, masked: bool = False, bottom_right: bool = False,
             cum_q=None, cum_k=None, window=(-1, -1)) -> Geometry:
    """Pairs and head dims for one call. layout 'bhsd' (SDPA ops) or 'bshd' (flash/efficient)."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if layout == "bhsd":
        batch, heads, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        seqs = [(sq, sk)] * batch
    elif cum_q is not None and (q.dim() == 3 or q.shape[0] == 1):  # packed: [T, H, D] or [1, T, H, D]
        heads = q.shape[-2]
        seqs = list(zip(_lengths(cum_q), _lengths(cum_k if cum_k is not None else cum_q)))
    else:
        batch, sq, heads, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
        seqs = [(sq, sk)] * batch
    left, right = window
    pairs = 0
    for sq, sk in seqs:
        if masked or not (causal or left >= 0 or right >= 0):
            pairs += sq * sk
        elif left >= 0 or right >= 0 or bottom_right:
            offset = sk - sq if bottom_right else 0
            pairs += window_pairs(sq, sk, left, 0 if causal else right, offset)
        else:
            pairs += causal_pairs(sq, sk)
    return Geometry(pairs * heads, d_qk, d_v)


def _bind(op, args, kwargs) -> dict:
    names = [a.name for a in op.default._schema.arguments]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _window(bound) -> tuple[int, int]:
    left, right = bound.get("window_size_left"), bound.get("window_size_right")
    if left is None and bound.get("window_size") is not None:  # efficient attention: one size
        left, right = bound["window_size"], -1
    return (-1 if left is None else int(left), -1 if right is None else int(right))


def _register(ops, layout: str, backward: bool):
    def make(op):
        def attention_formula(*args, out=None, **kwargs) -> list[Work]:
            b = _bind(op, args, kwargs)
            mask_type = b.get("custom_mask_type") or 0
            g = geometry(
                b["query"], b["key"], b["value"], layout=layout,
                causal=bool(b.get("is_causal")) or mask_type in (1, 2),
                bottom_right=mask_type == 2,
                masked=any(b.get(n) is not None for n in ("attn_mask", "attn_bias", "bias")),
                cum_q=b.get("cum_seq_q", b.get("cu_seqlens_q")),
                cum_k=b.get("cum_seq_k", b.get("cu_seqlens_k")),
                window=_window(b))
            return backward_work(g) if backward else forward_work(g)
        attention_formula.__name__ = f"{op.__name__}_flops"
        return attention_formula

    for op in ops:
        if op is not None:
            formula(op, "attention", needs_values=True)(make(op))


def _ops(*names):
    return [getattr(aten, n, None) for n in names]


_register(_ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_fused_attention_overrideable"), "bhsd", backward=False)
_register(_ops("_scaled_dot_product_flash_attention_for_cpu_backward",
               "_scaled_dot_product_flash_attention_backward",
               "_scaled_dot_product_efficient_attention_backward",
               "_scaled_dot_product_cudnn_attention_backward",
               "_scaled_dot_product_fused_attention_overrideable_backward"), "bhsd", backward=True)
_register(_ops("_flash_attention_forward", "_efficient_attention_forward"), "bshd", backward=False)
_register(_ops("_flash_attention_backward", "_efficient_attention_backward"), "bshd", backward=True)
