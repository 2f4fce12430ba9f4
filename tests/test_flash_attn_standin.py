"""flash-attn 2/3 formulas against stand-ins: custom ops defined here under the libraries' qualified
names and argument order, with CPU reference implementations (flash-attn itself needs CUDA).
Closed forms use the SDPA conventions (DESIGN.md): forward 2·P·(Dqk + Dv) per query head,
backward twice that, plus the recomputed score product 2·P·Dqk in phase recompute."""
from __future__ import annotations

import math

import pytest
import torch

import flopcount
from flopcount.formulas.constants import PER_ELEMENT

SOFTMAX, SOFTMAX_BWD = PER_ELEMENT["attention_softmax_forward"].flops, PER_ELEMENT["attention_softmax_backward"].flops
SOFTCAP, SOFTCAP_BWD = PER_ELEMENT["attention_softcap"].flops, PER_ELEMENT["attention_softcap_backward"].flops


def _scores(q, k, causal, left, right, softcap):
    """Masked (and capped) scores [B, H, Sq, Sk] with flash-attn's bottom-right aligned mask, and
    the tanh of the capped raw scores (for the backward)."""
    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    raw = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    t = torch.tanh(raw / softcap) if softcap else None
    scores = softcap * t if softcap else raw
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    right = 0 if causal else right
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return scores.masked_fill(~keep, float("-inf")), t


def _heads(k, h):
    return k.repeat_interleave(h // k.shape[2], 2)


def reference(q, k, v, causal, left, right, softcap):
    """[B, S, H, D] attention (GQA: K/V heads repeated)."""
    h = q.shape[2]
    p = _scores(q, _heads(k, h), causal, left, right, softcap)[0].softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, _heads(v, h)).contiguous()


def reference_backward(dout, q, k, v, causal, left, right, softcap):
    """dQ, dK, dV of ``reference`` by the softmax-attention gradient formulas."""
    h, hk, d = q.shape[2], k.shape[2], q.shape[-1]
    kk, vv = _heads(k, h), _heads(v, h)
    scores, t = _scores(q, kk, causal, left, right, softcap)
    p = scores.softmax(-1)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    if softcap:
        ds = ds * (1 - t * t)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kk) / math.sqrt(d)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) / math.sqrt(d)
    fold = lambda g: g.unflatten(2, (hk, h // hk)).sum(3)  # noqa: E731  (GQA: sum the repeated heads)
    return dq, fold(dk), fold(dv)


@pytest.fixture(scope="module")
def fa2():
    """flash_attn::_flash_attn_forward / _backward stand-ins, differentiable through register_autograd."""
    if hasattr(torch.ops, "flash_attn") and hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        return torch.ops.flash_attn
    @torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
                causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                alibi_slopes: torch.Tensor | None, return_softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out = reference(q, k, v, causal, window_size_left, window_size_right, softcap)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    @torch.library.custom_op("flash_attn::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
    def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 softmax_lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dropout_p: float,
                 softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                 alibi_slopes: torch.Tensor | None, deterministic: bool) -> torch.Tensor:
        grads = reference_backward(dout, q, k, v, causal, window_size_left, window_size_right, softcap)
        for target, grad in zip((dq, dk, dv), grads):
            target.copy_(grad)
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def setup_context(ctx, inputs, output):
        q, k, v, _, _, causal, left, right, softcap, _, _ = inputs
        ctx.save_for_backward(q, k, v, output[0])
        ctx.options = (causal, left, right, softcap)

    def grad(ctx, dout, dlse):
        q, k, v, out = ctx.saved_tensors
        causal, left, right, softcap = ctx.options
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        torch.ops.flash_attn._flash_attn_backward(dout, q, k, v, out, dlse, dq, dk, dv, 0.0, 1.0, causal, left,
                                                  right, softcap, None, False)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    torch.library.register_autograd("flash_attn::_flash_attn_forward", grad, setup_context=setup_context)
    return torch.ops.flash_attn


def window_pairs(sq, sk, left, right):
    return sum(1 for i in range(sq) for j in range(sk)
               if (left < 0 or j >= i + sk - sq - left) and (right < 0 or j <= i + sk - sq + right))


@pytest.mark.parametrize("causal, left, right, softcap", [
    (False, -1, -1, 0.0), (True, -1, -1, 0.0), (False, 3, 1, 0.0), (True, 2, -1, 30.0)])
def test_flash_attn2_forward_backward_recompute(backend, fa2, causal, left, right, softcap):
    b, sq, sk, h, hk, d = 2, 6, 9, 4, 2, 8
    q = torch.randn(b, sq, h, d, requires_grad=True)
    k, v = (torch.randn(b, sk, hk, d, requires_grad=True) for _ in range(2))
    with flopcount.meter(backend=backend, strict=True) as m:
        out, _ = fa2._flash_attn_forward(q, k, v, 0.0, 1.0, causal, left, right, softcap, None, False)
        out.sum().backward()
        m.step()
    s = m.summary()
    assert s["uncounted_ops"] == {}
    pairs = b * h * window_pairs(sq, sk, left, 0 if causal else right)
    gemm = 2 * pairs * (d + d)
    phases = s["by_phase_category"]
    assert phases["forward"]["attention"] == gemm
    assert phases["backward"]["attention"] == 2 * gemm
    assert phases["recompute"]["attention"] == 2 * pairs * d
    cap = bool(softcap)
    assert s["by_op"]["flash_attn._flash_attn_forward"]["flops"] == gemm + (SOFTMAX + SOFTCAP * cap) * pairs
    assert s["by_op"]["flash_attn._flash_attn_backward"]["flops"] == (
        2 * gemm + 2 * pairs * d + (SOFTMAX_BWD + SOFTMAX + (SOFTCAP + SOFTCAP_BWD) * cap) * pairs)


def test_reference_backward_is_the_gradient():
    """The stand-in's backward is the true gradient of its forward (checked with autograd)."""
    q = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    grads = torch.autograd.grad(reference(q, k, v, True, 2, -1, 5.0), (q, k, v), dout)
    for mine, true in zip(reference_backward(dout, q, k, v, True, 2, -1, 5.0), grads):
        torch.testing.assert_close(mine, true)


def test_flash_attn_varlen_formula():
    """Packed sequences [T, H, D] with cumulative offsets: pairs summed per sequence (FA2 and FA3)."""
    from flopcount.formulas.flash_attn import FA2_VARLEN_FORWARD, FA3_BACKWARD, bind, flash_works

    lengths = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    t, h, d = sum(lengths), 4, 16
    q = k = v = torch.zeros(t, h, d)
    b = bind(FA2_VARLEN_FORWARD, (q, k, v, cu, cu, 5, 5, 0.0, 1.0, True), {})
    pairs = h * sum(n * (n + 1) // 2 for n in lengths)
    assert flash_works(b, backward=False)[0].flops == 2 * pairs * 2 * d
    b3 = bind(FA3_BACKWARD, (q, q, k, v, q, None, cu, cu), {"is_causal": False})
    full = h * sum(n * n for n in lengths)
    assert flash_works(b3, backward=True)[0].flops == 4 * full * 2 * d
