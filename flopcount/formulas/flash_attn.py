"""flash-attn 2 (``flash_attn::``) and 3 (``flash_attn_3::``) custom ops, with SDPA's conventions.

Registered by qualified name (nothing is imported from flash-attn). Tensors are [B, S, H, D], or
[T, H, D] with ``cu_seqlens`` offsets (varlen). The pairs computed follow flash-attn's masks:
causal and sliding windows are aligned bottom-right (query i sees keys up to i + Sk - Sq),
``window_size_left/right = -1`` is unbounded. Forward, backward and the backward's recomputed
score product are attention.py's ``forward_work`` / ``backward_work``; a softcap adds
``attention_softcap`` per pair (and its derivative in backward), dropout ``native_dropout``.
"""
from __future__ import annotations

from ..conventions import RECOMPUTE
from .attention import backward_work, forward_work, geometry
from .constants import PER_ELEMENT
from .registry import Work, formula

# Argument names in the libraries' order (positional calls are bound by them).
FA2_FORWARD = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
               "softcap", "alibi_slopes", "return_softmax")
FA2_VARLEN_FORWARD = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                      "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap", "alibi_slopes",
                      "return_softmax", "block_table", "leftpad_k", "seqused_k", "zero_tensors")
FA2_BACKWARD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p", "softmax_scale",
                "causal", "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic",
                "rng_state")
FA2_VARLEN_BACKWARD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q",
                       "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale", "causal",
                       "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic",
                       "rng_state", "zero_tensors")
FA3_FORWARD = ("q", "k", "v", "k_new", "v_new", "qv", "out_", "cu_seqlens_q", "cu_seqlens_k", "cu_seqlens_k_new",
               "seqused_q", "seqused_k", "max_seqlen_q", "max_seqlen_k", "page_table", "kv_batch_idx", "leftpad_k",
               "rotary_cos", "rotary_sin", "seqlens_rotary", "q_descale", "k_descale", "v_descale",
               "softmax_scale", "causal", "window_size_left", "window_size_right", "attention_chunk", "softcap")
FA3_BACKWARD = ("dout", "q", "k", "v", "out", "softmax_lse", "cu_seqlens_q", "cu_seqlens_k", "seqused_q",
                "seqused_k", "max_seqlen_q", "max_seqlen_k", "dq", "dk", "dv", "softmax_scale", "is_causal",
                "window_size_left", "window_size_right", "softcap")

SOFTCAP = PER_ELEMENT["attention_softcap"].flops
SOFTCAP_BWD = PER_ELEMENT["attention_softcap_backward"].flops
DROPOUT = PER_ELEMENT["native_dropout"].flops


def bind(names, args, kwargs) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def flash_works(b: dict, *, backward: bool) -> list[Work]:
    """Work of one flash-attn call from its bound arguments (raw tensors)."""
    left, right = b.get("window_size_left", -1), b.get("window_size_right", -1)
    left = -1 if left is None else int(left)
    right = -1 if right is None else int(right)
    causal = bool(b.get("causal", b.get("is_causal", False)))
    g = geometry(b["q"], b["k"], b["v"], layout="bshd", causal=causal, bottom_right=True,
                 cum_q=b.get("cu_seqlens_q"), cum_k=b.get("cu_seqlens_k"), window=(left, right))
    works = backward_work(g) if backward else forward_work(g)
    if b.get("softcap"):
        if backward:  # the capped scores are recomputed, then differentiated
            works += [Work("pointwise", SOFTCAP * g.pairs, RECOMPUTE), Work("pointwise", SOFTCAP_BWD * g.pairs)]
        else:
            works.append(Work("pointwise", SOFTCAP * g.pairs))
    if b.get("dropout_p"):
        works.append(Work("pointwise", DROPOUT * g.pairs))
    return works


def _register(name: str, names, backward: bool) -> None:
    def flash_attention_formula(*args, out=None, **kwargs) -> list[Work]:
        return flash_works(bind(names, args, kwargs), backward=backward)

    flash_attention_formula.__name__ = name.replace("::", "_") + "_flops"
    formula(name, "attention", needs_values=True)(flash_attention_formula)


_register("flash_attn::_flash_attn_forward", FA2_FORWARD, backward=False)
_register("flash_attn::_flash_attn_varlen_forward", FA2_VARLEN_FORWARD, backward=False)
_register("flash_attn::_flash_attn_backward", FA2_BACKWARD, backward=True)
_register("flash_attn::_flash_attn_varlen_backward", FA2_VARLEN_BACKWARD, backward=True)
_register("flash_attn_3::_flash_attn_forward", FA3_FORWARD, backward=False)
_register("flash_attn_3::_flash_attn_backward", FA3_BACKWARD, backward=True)
