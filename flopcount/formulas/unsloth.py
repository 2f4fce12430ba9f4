"""Unsloth's Triton kernels (``unsloth.kernels``), counted at their Python API
(integrations/kernels.py): its autograd Functions, and the SwiGLU/GeGLU kernel functions that
its fused LoRA MLP calls in forward and backward. Its LoRA matmuls run as aten ops and are
counted there (the fused LoRA Functions are not wrapped, so nothing is counted twice).

Per-element constants are torch's (constants.py), so a model keeps its count when Unsloth swaps
its norms, activations and loss in:

- ``Fast_RMS_Layernorm`` / ``Fast_Layernorm``: as ``rms_norm`` / ``layer_norm`` with weight (and
  bias); Gemma's ``1 + w`` adds 1 per element;
- ``Fast_RoPE_Embedding`` (``_QK``): x·cos + rotate(x)·sin, 3 per element of q (and k), the same
  backward;
- ``Fast_CrossEntropyLoss``: per logit a log-sum-exp (``logsumexp``, 4), scaling (1) and softcap
  (``attention_softcap``) when set; backward softmax - onehot, times the upstream gradient
  (3 per logit: subtract, exp, multiply), plus the softcap and scaling derivatives;
- ``swiglu_fg_kernel`` (forward, silu(e)·g: 6 per element) and ``swiglu_DWf_DW_dfg_kernel``
  (backward: it recomputes h = silu(e)·g (6, phase ``recompute``), computes df and dg (2) and de
  as torch's ``silu_backward`` (9)); GeGLU likewise with ``gelu`` / ``gelu_tanh``;
- ``grouped_gemm`` (MoE experts): 2·M·N·K over the M routed rows (``num_tokens·topk``), backward
  the input and weight gradients.
"""
from __future__ import annotations

from ..conventions import RECOMPUTE
from .constants import PER_ELEMENT
from .kernels_api import norm_works
from .registry import Work


def _c(name: str) -> int:
    return PER_ELEMENT[name].flops


def rms_layernorm(tokens: int, features: int, *, gemma: bool) -> tuple[list[Work], list[Work]]:
    forward, backward = norm_works(tokens, features, rms=True)
    if gemma:
        forward = [Work("norm", forward[0].flops + tokens * features)]
    return forward, backward


def layernorm(tokens: int, features: int) -> tuple[list[Work], list[Work]]:
    return norm_works(tokens, features, rms=False)


def rope(elements: int) -> tuple[list[Work], list[Work]]:
    return [Work("pointwise", 3 * elements)], [Work("pointwise", 3 * elements)]


def cross_entropy(rows: int, vocab: int, *, softcap: bool, scaling: bool) -> tuple[list[Work], list[Work]]:
    n = rows * vocab
    extra_fwd = _c("attention_softcap") * softcap + scaling
    extra_bwd = (_c("attention_softcap") + _c("attention_softcap_backward")) * softcap + 2 * scaling
    return ([Work("pointwise", n * (_c("logsumexp") + extra_fwd)), Work("reduction", rows)],
            [Work("pointwise", n * (3 + extra_bwd))])


GLU = {"swiglu": ("silu", "silu_backward"), "geglu_exact": ("gelu", "gelu_backward"),
       "geglu_approx": ("gelu_tanh", "gelu_tanh_backward")}


def glu_forward(elements: int, kind: str) -> list[Work]:
    """h = act(e) · g."""
    return [Work("pointwise", elements * (_c(GLU[kind][0]) + 1))]


def glu_backward(elements: int, kind: str) -> list[Work]:
    """The fused backward: h = act(e)·g recomputed for the down projection's weight gradient
    (phase recompute), then df = dh·act(e) and dg = dh·g (2) and de = dg·act'(e) as torch's
    activation backward."""
    act, act_backward = GLU[kind]
    return [Work("pointwise", elements * (_c(act) + 1), RECOMPUTE),
            Work("pointwise", elements * (_c(act_backward) + 2))]


def grouped_gemm(rows: int, n: int, k: int, *, input_grad: bool = True,
                 weight_grad: bool = True) -> tuple[list[Work], list[Work]]:
    gemm = 2 * rows * n * k
    return [Work("matmul", gemm)], [Work("matmul", gemm * (int(input_grad) + int(weight_grad)))]
