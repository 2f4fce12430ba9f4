"""xformers memory-efficient attention (``xformers.ops.memory_efficient_attention``), with SDPA's
conventions (attention.py): forward 2·P·(D_qk + D_v) per query head, backward twice that plus the
recomputed score product in phase ``recompute``.

xformers picks a kernel per call; the ones that are ops of their own are counted here by
qualified name (nothing is imported from xformers):

- ``xformers_flash::flash_fwd`` / ``flash_bwd`` (FlashAttention 2) and ``xformers_flash3::...``
  (FlashAttention 3): flash-attn's masks, causal and windows aligned bottom-right, packed
  sequences by ``cu_seqlens`` (keys per sequence: ``seqused_k`` when given);
- ``xformers::efficient_attention_forward_ck`` / ``backward_ck`` (ROCm): the mask types of
  ``aten._efficient_attention_forward`` (1 causal top-left, 2 bottom-right), ``window_size``;
- ``xformer::memory_efficient_attention_forward`` (``_with_bias``): the op xformers defines for
  ``torch.compile``; a bias tensor means every pair is computed.

The CUTLASS kernel is PyTorch's ``aten._efficient_attention_forward``/``_backward`` since xformers
0.0.28 and is counted by attention.py. Arguments are bound by the op's own schema, so a new
argument in a later xformers release does not shift the others. Triton split-K decoding kernels
(inference) are Triton kernels without a formula: reported uncounted.
"""
from __future__ import annotations

import torch

from .attention import backward_work, forward_work, geometry
from .constants import PER_ELEMENT
from .registry import Work, formula

DROPOUT = PER_ELEMENT["native_dropout"].flops


def bind(qualified: str, args, kwargs) -> dict:
    """Arguments by name, from the op's schema (the op exists: it is being called)."""
    namespace, name = qualified.split("::")
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip((a.name for a in schema.arguments), args))
    bound.update(kwargs)
    return bound


def _key_offsets(b: dict):
    """Cumulative key offsets: from ``seqused_k`` (keys used per sequence) when given."""
    used = b.get("seqused_k")
    if used is not None:
        return torch.cat([used.new_zeros(1), used.reshape(-1).cumsum(0)])
    return b.get("cu_seqlens_k")


def _int(value, default: int = -1) -> int:
    return default if value is None else int(value)


def flash_works(b: dict, *, backward: bool) -> list[Work]:
    g = geometry(b["query"], b["key"], b["value"], layout="bshd", causal=bool(b.get("is_causal")),
                 bottom_right=True, cum_q=b.get("cu_seqlens_q"), cum_k=_key_offsets(b),
                 window=(_int(b.get("window_left")), _int(b.get("window_right"))))
    works = backward_work(g) if backward else forward_work(g)
    if b.get("p"):
        works.append(Work("pointwise", DROPOUT * g.pairs))
    return works


def ck_works(b: dict, *, backward: bool) -> list[Work]:
    mask_type = _int(b.get("custom_mask_type"), 0)
    window = _int(b.get("window_size"), 0)
    g = geometry(b["query"], b["key"], b["value"], layout="bshd", causal=mask_type in (1, 2),
                 bottom_right=mask_type == 2, masked=b.get("attn_bias") is not None,
                 cum_q=b.get("seqstart_q"), cum_k=b.get("seqstart_k"),
                 window=(window - 1 if window > 0 else -1, -1))  # window_size counts the diagonal
    works = backward_work(g) if backward else forward_work(g)
    if b.get("dropout_p"):
        works.append(Work("pointwise", DROPOUT * g.pairs))
    return works


def compile_op_works(b: dict) -> list[Work]:
    g = geometry(b["q"], b["k"], b["v"], layout="bshd", causal=False, masked=b.get("b") is not None)
    works = forward_work(g)
    if b.get("p"):
        works.append(Work("pointwise", DROPOUT * g.pairs))
    return works


def _register(qualified: str, works_of, **options) -> None:
    def xformers_attention_formula(*args, out=None, **kwargs) -> list[Work]:
        return works_of(bind(qualified, args, kwargs), **options)

    xformers_attention_formula.__name__ = qualified.replace("::", "_") + "_flops"
    formula(qualified, "attention", needs_values=True)(xformers_attention_formula)


for _ns in ("xformers_flash", "xformers_flash3"):
    _register(f"{_ns}::flash_fwd", flash_works, backward=False)
    _register(f"{_ns}::flash_bwd", flash_works, backward=True)
_register("xformers::efficient_attention_forward_ck", ck_works, backward=False)
_register("xformers::efficient_attention_backward_ck", ck_works, backward=True)
_register("xformer::memory_efficient_attention_forward", compile_op_works)
_register("xformer::memory_efficient_attention_forward_with_bias", compile_op_works)
