"""mamba-ssm's SSD chunk scan, flash-linear-attention and Unsloth, counted at their Python API
(integrations/kernels.py), against stand-ins installed in sys.modules under the real module
paths and signatures, with numpy reference implementations (invisible to every capture path,
like the real Triton kernels). Closed forms are written out here from the formulas' docstrings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import flopcount
from flopcount.formulas.constants import PER_ELEMENT
from test_kernels_api import fake_modules, install, np_  # noqa: F401  (fixture)


def c(name: str) -> int:
    return PER_ELEMENT[name].flops


def metered(backend, fn):
    with flopcount.meter(backend=backend, strict=True) as m:
        fn()
        m.step()
    return m.summary()


def _numpy_function(forward):
    """An autograd Function computing ``forward`` in numpy; its backward returns zeros."""
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            ctx.shapes = [t.shape if isinstance(t, torch.Tensor) else None for t in tensors]
            return torch.from_numpy(np.ascontiguousarray(forward(*[np_(t) if isinstance(t, torch.Tensor) else t
                                                                  for t in tensors])))

        @staticmethod
        def backward(ctx, g):
            return tuple(torch.zeros(s) if s is not None else None for s in ctx.shapes)

    return Fn


def ssd_reference(x, dt, a, b, cc, d):
    """Mamba-2's recurrence token by token: h = exp(dt·A) h + dt·B xᵀ, y = C h + D x."""
    batch, length, heads, p = x.shape
    groups, n = b.shape[2], b.shape[3]
    y = np.zeros_like(x)
    for bi in range(batch):
        h = np.zeros((heads, p, n), x.dtype)
        for t in range(length):
            for hi in range(heads):
                g = hi * groups // heads
                h[hi] = np.exp(dt[bi, t, hi] * a[hi]) * h[hi] + dt[bi, t, hi] * np.outer(x[bi, t, hi], b[bi, t, g])
                y[bi, t, hi] = h[hi] @ cc[bi, t, g] + d[hi] * x[bi, t, hi]
    return y


def test_mamba_chunk_scan_combined(fake_modules, backend):
    fn = _numpy_function(lambda x, dt, a, b, cc, d: ssd_reference(x, dt, a, b, cc, d))

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                  return_final_states=False, return_varlen_states=False):
        return fn.apply(x, dt, A, B, C, D)

    ssd = install("mamba_ssm.ops.triton.ssd_combined", mamba_chunk_scan_combined=mamba_chunk_scan_combined)
    batch, length, heads, p, n, groups, chunk = 2, 10, 4, 3, 5, 2, 4
    x = torch.randn(batch, length, heads, p, requires_grad=True)
    dt, a = torch.rand(batch, length, heads), -torch.rand(heads)
    b, cc, d = torch.randn(batch, length, groups, n), torch.randn(batch, length, groups, n), torch.ones(heads)
    s = metered(backend, lambda: ssd.mamba_chunk_scan_combined(x, dt, a, b, cc, chunk, D=d).sum().backward())
    assert s["uncounted_ops"] == {}
    chunks = [4, 4, 2]
    cb = 2 * groups * n * sum(k * k for k in chunks)
    products = 2 * heads * p * (sum(k * (k + 1) // 2 for k in chunks) + 2 * length * n)
    passing = 2 * heads * n * p * len(chunks)
    vector = length * heads * 2 + 3 * heads * sum(k * (k + 1) // 2 for k in chunks) + 2 * length * heads * p
    phases = s["by_phase_category"]
    assert phases["forward"]["matmul"] == batch * (cb + products)
    assert phases["forward"]["pointwise"] == batch * (passing + vector)
    assert phases["backward"]["matmul"] == 2 * batch * (cb + products)
    assert phases["recompute"]["matmul"] == batch * (cb + 2 * heads * length * n * p)


def gated_delta_rule_reference(q, k, v, g, beta):
    """The recurrent gated delta rule: S = exp(g) S (I - β k kᵀ) + β v kᵀ, o = S q (per head)."""
    batch, length, heads, dk = q.shape
    o = np.zeros(v.shape, v.dtype)
    for bi in range(batch):
        for h in range(heads):
            s = np.zeros((v.shape[-1], dk), v.dtype)
            for t in range(length):
                kt, bt = k[bi, t, h], beta[bi, t, h]
                s = np.exp(g[bi, t, h]) * s
                s = s + bt * np.outer(v[bi, t, h] - s @ kt, kt)
                o[bi, t, h] = s @ q[bi, t, h] / np.sqrt(dk)
    return o


def test_fla_chunk_gated_delta_rule(fake_modules, backend):
    fn = _numpy_function(gated_delta_rule_reference)

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):
        return fn.apply(q, k, v, g, beta), None

    gdn = install("fla.ops.gated_delta_rule.chunk", chunk_gated_delta_rule=chunk_gated_delta_rule)
    batch, length, heads, dk, dv = 1, 70, 2, 4, 6
    q, k = torch.randn(batch, length, heads, dk, requires_grad=True), torch.randn(batch, length, heads, dk)
    v = torch.randn(batch, length, heads, dv)
    g, beta = -torch.rand(batch, length, heads), torch.rand(batch, length, heads)
    s = metered(backend, lambda: gdn.chunk_gated_delta_rule(q, k, v, g, beta)[0].sum().backward())
    assert s["uncounted_ops"] == {}
    chunks = [64, 6]  # 70 tokens in chunks of 64
    pairs = sum(n * (n + 1) // 2 for n in chunks)
    state = 2 * length * dk * dv
    gemm = (2 * pairs * (dk + dv) + 2 * state  # intra-chunk Q Kᵀ, A V; Q S and Kᵀ V
            + 2 * sum(n * (n - 1) // 2 for n in chunks) * dk  # (βK) Kᵀ, strictly lower
            + 2 * sum(n * n for n in chunks) * (dk + dv) + state)  # w, u and u - w S
    solve = sum(n * n * (n - 1) for n in chunks)  # unit lower triangular inverse: n² (n-1)
    gates = 2 * (length + pairs)
    phases = s["by_phase_category"]
    assert phases["forward"]["attention"] == heads * gemm
    assert phases["forward"]["other"] == heads * solve
    assert phases["forward"]["pointwise"] == heads * gates
    assert phases["backward"]["attention"] == 2 * heads * gemm
    assert phases["recompute"]["attention"] == heads * state


def test_unsloth_norm_loss_and_fused_swiglu(fake_modules, backend):
    rms = _numpy_function(lambda x, w, eps, gemma: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w)
    ce = _numpy_function(lambda logits, labels, cap, scale: np.log(np.exp(logits).sum(-1)) - logits[
        np.arange(len(labels)), labels])

    def swiglu_fg_kernel(e, g):
        return torch.from_numpy(np_(e) / (1 + np.exp(-np_(e))) * np_(g))

    def swiglu_DWf_DW_dfg_kernel(dw, e, g):
        return dw, e, g  # the real kernel overwrites its inputs with h, df, de

    calls = install("unsloth.kernels.swiglu", swiglu_fg_kernel=swiglu_fg_kernel,
                    swiglu_DWf_DW_dfg_kernel=swiglu_DWf_DW_dfg_kernel)
    install("unsloth.kernels.rms_layernorm", Fast_RMS_Layernorm=rms)
    install("unsloth.kernels.cross_entropy_loss", Fast_CrossEntropyLoss=ce)

    class FusedMLP(torch.autograd.Function):  # unsloth's LoRA_MLP calls the kernels by name
        @staticmethod
        def forward(ctx, e, g):
            ctx.save_for_backward(e, g)
            return calls.swiglu_fg_kernel(e, g)

        @staticmethod
        def backward(ctx, dw):
            e, g = ctx.saved_tensors
            calls.swiglu_DWf_DW_dfg_kernel(dw, e.clone(), g.clone())
            return torch.zeros_like(e), torch.zeros_like(g)

    tokens, hidden, ffn, vocab = 6, 16, 24, 40
    x = torch.randn(tokens, hidden, requires_grad=True)
    e, g = torch.randn(tokens, ffn, requires_grad=True), torch.randn(tokens, ffn)
    logits, labels = torch.randn(tokens, vocab, requires_grad=True), torch.randint(0, vocab, (tokens,))

    def step():
        (rms.apply(x, torch.ones(hidden), 1e-6, False).sum() + FusedMLP.apply(e, g).sum()
         + ce.apply(logits, labels, 0, 0).sum()).backward()

    s = metered(backend, step)
    assert s["uncounted_ops"] == {}
    n, m, v = tokens * hidden, tokens * ffn, tokens * vocab
    phases = s["by_phase_category"]
    assert phases["forward"]["norm"] == n * (c("rms_norm_forward") + 1)
    assert phases["backward"]["norm"] == n * (c("rms_norm_backward_input") + c("norm_backward_weight"))
    ops = s["by_op"]
    assert ops["unsloth.kernels.swiglu.swiglu_fg_kernel"]["flops"] == m * (c("silu") + 1)
    assert ops["unsloth.kernels.swiglu.swiglu_DWf_DW_dfg_kernel"]["flops"] == m * (c("silu") + 1 + c("silu_backward") + 2)
    assert phases["recompute"]["pointwise"] == m * (c("silu") + 1)  # h recomputed in the backward kernel
    ce_ops = ops["unsloth.kernels.cross_entropy_loss.Fast_CrossEntropyLoss.apply"]
    assert ce_ops == {"flops": v * c("logsumexp") + tokens + 3 * v, "calls": 2}  # forward; backward
