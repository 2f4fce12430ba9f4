"""xformers memory-efficient attention formulas against stand-ins: custom ops defined here under
xformers' qualified names and argument lists (xformers_flash::flash_fwd / flash_bwd, the compile
op xformer::memory_efficient_attention_forward), with CPU reference implementations (xformers'
kernels need CUDA). Closed forms use the SDPA conventions (DESIGN.md)."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

import flopcount
from flopcount.formulas.constants import PER_ELEMENT
from test_flash_attn_standin import reference, reference_backward, window_pairs

SOFTMAX, SOFTMAX_BWD = PER_ELEMENT["attention_softmax_forward"].flops, PER_ELEMENT["attention_softmax_backward"].flops


@pytest.fixture(scope="module")
def xformers_flash():
    """xformers_flash::flash_fwd / flash_bwd with xformers 0.0.32's signatures."""
    if hasattr(torch.ops, "xformers_flash") and hasattr(torch.ops.xformers_flash, "flash_fwd"):
        return torch.ops.xformers_flash

    @torch.library.custom_op("xformers_flash::flash_fwd", mutates_args=())
    def flash_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], max_seqlen_q: int,
                  max_seqlen_k: int, p: float, softmax_scale: float, is_causal: bool, window_left: int,
                  window_right: int, return_softmax: bool, block_tables: Optional[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = reference(query, key, value, is_causal, window_left, window_right, 0.0)
        return out, torch.zeros(query.shape[0], query.shape[2], query.shape[1]), torch.zeros(2, dtype=torch.int64)

    @torch.library.custom_op("xformers_flash::flash_bwd", mutates_args=())
    def flash_bwd(grads_share_storage: bool, grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                  cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, p: float,
                  softmax_scale: float, is_causal: bool, window_left: int, window_right: int,
                  rng_state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return reference_backward(grad, query, key, value, is_causal, window_left, window_right, 0.0)

    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        ctx.save_for_backward(q, k, v, output[0], output[1])
        ctx.options = (inputs[10], inputs[11], inputs[12])

    def grad(ctx, dout, dlse, drng):
        q, k, v, out, lse = ctx.saved_tensors
        causal, left, right = ctx.options
        dq, dk, dv = torch.ops.xformers_flash.flash_bwd(False, dout, q, k, v, out, lse, None, None, q.shape[1],
                                                        k.shape[1], 0.0, 1.0, causal, left, right, None)
        return dq, dk, dv, *([None] * 12)

    torch.library.register_autograd("xformers_flash::flash_fwd", grad, setup_context=setup_context)
    return torch.ops.xformers_flash


@pytest.mark.parametrize("causal, left, right", [(False, -1, -1), (True, -1, -1), (False, 2, 1)])
def test_xformers_flash_forward_backward_recompute(backend, xformers_flash, causal, left, right):
    b, sq, sk, h, hk, d = 2, 5, 7, 4, 2, 8
    q = torch.randn(b, sq, h, d, requires_grad=True)
    k, v = (torch.randn(b, sk, hk, d, requires_grad=True) for _ in range(2))
    with flopcount.meter(backend=backend, strict=True) as m:
        out, _, _ = xformers_flash.flash_fwd(q, k, v, None, None, None, sq, sk, 0.0, 1.0, causal, left, right,
                                             False, None)
        out.sum().backward()
        m.step()
    s = m.summary()
    assert s["uncounted_ops"] == {}
    pairs = b * h * window_pairs(sq, sk, left, 0 if causal else right)  # bottom-right aligned
    gemm = 2 * pairs * (d + d)
    phases = s["by_phase_category"]
    assert phases["forward"]["attention"] == gemm
    assert phases["backward"]["attention"] == 2 * gemm
    assert phases["recompute"]["attention"] == 2 * pairs * d
    assert s["by_op"]["xformers_flash.flash_fwd"]["flops"] == gemm + SOFTMAX * pairs
    assert s["by_op"]["xformers_flash.flash_bwd"]["flops"] == 2 * gemm + 2 * pairs * d + (SOFTMAX_BWD + SOFTMAX) * pairs


def test_xformers_varlen_and_seqused_k():
    """Packed sequences [T, H, D]: pairs per sequence; seqused_k gives the keys each one uses."""
    from flopcount.formulas.xformers import flash_works

    q = k = v = torch.zeros(10, 4, 16)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    b = dict(query=q, key=k, value=v, cu_seqlens_q=cu, cu_seqlens_k=cu, is_causal=True)
    pairs = 4 * sum(n * (n + 1) // 2 for n in (3, 5, 2))
    assert flash_works(b, backward=False)[0].flops == 2 * pairs * 32
    b = dict(query=q, key=torch.zeros(12, 4, 16), value=torch.zeros(12, 4, 16), cu_seqlens_q=cu,
             cu_seqlens_k=torch.tensor([0, 4, 8, 12]), seqused_k=torch.tensor([4, 2, 3]), is_causal=False)
    assert flash_works(b, backward=False)[0].flops == 2 * 4 * (3 * 4 + 5 * 2 + 2 * 3) * 32


@pytest.fixture(scope="module")
def xformer_compile_op():
    """xformer::memory_efficient_attention_forward (xformers' op for torch.compile), CPU reference."""
    if not (hasattr(torch.ops, "xformer") and hasattr(torch.ops.xformer, "memory_efficient_attention_forward")):
        torch.library.define("xformer::memory_efficient_attention_forward",
                             "(Tensor q, Tensor k, Tensor v, Tensor? b = None, float? p = 0.0, float? scale = None)"
                             " -> Tensor")

        def cpu(q, k, v, b=None, p=0.0, scale=None):
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or q.shape[-1] ** -0.5)
            if b is not None:
                scores = scores + b
            return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).contiguous()

        torch.library.impl("xformer::memory_efficient_attention_forward", "CPU", cpu)
    return torch.ops.xformer


def test_xformer_compile_op_counts_every_pair_with_a_bias(backend, xformer_compile_op):
    b, sq, sk, h, d, dv = 2, 4, 6, 3, 8, 4
    q, k, v = torch.randn(b, sq, h, d), torch.randn(b, sk, h, d), torch.randn(b, sk, h, dv)
    bias = torch.zeros(b, h, sq, sk)
    with flopcount.meter(backend=backend, strict=True) as m:
        xformer_compile_op.memory_efficient_attention_forward(q, k, v)
        xformer_compile_op.memory_efficient_attention_forward(q, k, v, bias)
        m.step()
    s = m.summary()
    pairs = b * h * sq * sk
    assert s["by_category"]["attention"] == 2 * (2 * pairs * (d + dv))
    assert s["by_op"]["xformer.memory_efficient_attention_forward"]["calls"] == 2


def test_ck_local_attention_window():
    """ROCm's ck op: custom_mask_type 2 (causal, bottom-right) and a window of 3 keys (diagonal
    included), as xformers' BlockDiagonalCausalLocalAttentionFromBottomRightMask passes it."""
    from flopcount.formulas.xformers import ck_works

    q, k = torch.zeros(1, 5, 2, 8), torch.zeros(1, 7, 2, 8)
    works = ck_works(dict(query=q, key=k, value=k, custom_mask_type=2, window_size=3), backward=False)
    pairs = 2 * sum(1 for i in range(5) for j in range(7) if i + 2 - 2 <= j <= i + 2)
    assert works[0].flops == 2 * pairs * 16
