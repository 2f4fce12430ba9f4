"""Formulas for libraries counted at their Python API (their kernels bypass the dispatcher or are
Triton kernels without a formula): Transformer Engine modules, mamba-ssm's selective scan,
causal-conv1d, Liger kernels. Pure functions of shapes and options; integrations/kernels.py
calls them when a wrapped function or module runs, in the phase and module it runs in.

Each returns (forward works, backward works): the backward is booked when autograd runs it.
Precision (FP8 included) does not change a count (DESIGN.md: all precisions count the same).
"""
from __future__ import annotations

import math

from ..conventions import RECOMPUTE
from .attention import Geometry, backward_work, causal_pairs, forward_work
from .constants import PER_ELEMENT
from .registry import Work


def _c(name: str) -> int:
    return PER_ELEMENT[name].flops


def linear_works(tokens: int, n_in: int, n_out: int, *, bias: bool, weight_grad: bool = True,
                 input_grad: bool = True) -> tuple[list[Work], list[Work]]:
    """A Linear: 2·T·in·out forward; backward the input and weight gradients that are needed."""
    gemm = 2 * tokens * n_in * n_out
    forward = [Work("matmul", gemm)] + ([Work("pointwise", tokens * n_out)] if bias else [])
    backward = [Work("matmul", gemm * (int(input_grad) + int(weight_grad)))]
    if bias and weight_grad:
        backward.append(Work("reduction", tokens * n_out))
    return forward, backward


def norm_works(tokens: int, features: int, *, rms: bool, affine: int = 2) -> tuple[list[Work], list[Work]]:
    """LayerNorm / RMSNorm over ``features`` (affine: 1 weight, 2 weight and bias)."""
    n = tokens * features
    forward = _c("rms_norm_forward" if rms else "layer_norm_forward") + (1 if rms else affine)
    backward = (_c("rms_norm_backward_input" if rms else "layer_norm_backward_input")
                + _c("norm_backward_weight") + (0 if rms else _c("norm_backward_bias")))
    return [Work("norm", n * forward)], [Work("norm", n * backward)]


ACTIVATIONS = {  # TE activation name -> (forward, backward) FLOP per element of the activation input
    "gelu": ("gelu", "gelu_backward"), "relu": ("relu", "threshold_backward"), "silu": ("silu", "silu_backward"),
    "geglu": ("gelu", "gelu_backward"), "swiglu": ("silu", "silu_backward"), "reglu": ("relu", "threshold_backward"),
    "qgelu": ("gelu", "gelu_backward"), "srelu": ("relu", "threshold_backward"),
}
GATED = ("geglu", "swiglu", "reglu", "qgeglu")


def activation_works(tokens: int, ffn: int, activation: str) -> tuple[list[Work], list[Work]]:
    """Activation of an MLP hidden layer of width ``ffn``; gated ones multiply by the gate (+1
    forward, +2 backward per element)."""
    fwd, bwd = ACTIVATIONS.get(activation, ("gelu", "gelu_backward"))
    gated = activation in GATED
    n = tokens * ffn
    return ([Work("pointwise", n * (_c(fwd) + gated))], [Work("pointwise", n * (_c(bwd) + 2 * gated))])


def te_layernorm_mlp(tokens: int, hidden: int, ffn: int, *, activation: str, rms: bool, bias: bool):
    """LayerNormMLP: norm, fc1 (hidden -> ffn, or 2·ffn when gated), activation, fc2 (ffn -> hidden)."""
    fc1_out = ffn * (2 if activation in GATED else 1)
    parts = [norm_works(tokens, hidden, rms=rms), linear_works(tokens, hidden, fc1_out, bias=bias),
             activation_works(tokens, ffn, activation), linear_works(tokens, ffn, hidden, bias=bias)]
    return [w for f, _ in parts for w in f], [w for _, b in parts for w in b]


def te_attention(batch: int, heads: int, sq: int, sk: int, d_qk: int, d_v: int, *, causal: bool):
    """DotProductAttention: SDPA's conventions (fused kernels: backward 2x plus the recompute)."""
    pairs = batch * heads * (causal_pairs(sq, sk) if causal else sq * sk)
    g = Geometry(pairs, d_qk, d_v)
    backward = backward_work(g)
    return forward_work(g), backward


def selective_scan(batch: int, dim: int, length: int, state: int, *, has_d: bool, has_z: bool,
                   delta_bias: bool, delta_softplus: bool) -> tuple[list[Work], list[Work]]:
    """mamba-ssm's selective scan over u [B, D, L] with A [D, N]: per (b, d, l, n)
    ``selective_scan_step`` FLOP; per (b, d, l) the D skip (2), the z gate (silu + multiply) and
    delta's bias and softplus. The backward re-runs the scan (recompute) and differentiates it."""
    bdl = batch * dim * length
    per_bdl = 2 * has_d + (_c("silu") + 1) * has_z + int(delta_bias) + _c("softplus") * bool(delta_softplus)
    forward = bdl * state * _c("selective_scan_step") + bdl * per_bdl
    backward = bdl * state * _c("selective_scan_backward") + 2 * bdl * per_bdl
    return ([Work("other", forward)],
            [Work("other", backward), Work("other", bdl * state * _c("selective_scan_step"), RECOMPUTE)])


def causal_conv1d(batch: int, dim: int, length: int, width: int, *, bias: bool, activation: bool,
                  input_grad: bool = True, weight_grad: bool = True) -> tuple[list[Work], list[Work]]:
    """Depthwise causal conv1d, x [B, D, L], weight [D, W]: 2·B·D·L·W in ``conv`` (C_in/groups = 1);
    backward: input and weight gradients (each the same size), bias and activation gradients."""
    out = batch * dim * length
    forward = [Work("conv", 2 * out * width)]
    backward = [Work("conv", 2 * out * width * (int(input_grad) + int(weight_grad)))]
    if bias:
        forward.append(Work("pointwise", out))
        backward.append(Work("reduction", out))
    if activation:
        forward.append(Work("pointwise", out * _c("silu")))
        backward.append(Work("pointwise", out * _c("silu_backward")))
    return forward, backward


def liger_rms_norm(tokens: int, features: int):
    return norm_works(tokens, features, rms=True)


def liger_layer_norm(tokens: int, features: int):
    return norm_works(tokens, features, rms=False)


def liger_glu(elements: int, activation: str) -> tuple[list[Work], list[Work]]:
    """SwiGLU / GeGLU on the gate and up halves (``elements`` of the output): act(a) * b."""
    fwd, bwd = ("silu", "silu_backward") if activation == "silu" else ("gelu_tanh", "gelu_tanh_backward")
    return [Work("pointwise", elements * (_c(fwd) + 1))], [Work("pointwise", elements * (_c(bwd) + 2))]


def liger_rope(q_elements: int, k_elements: int) -> tuple[list[Work], list[Work]]:
    """Rotary embedding of q and k: x*cos + rotate(x)*sin, 3 FLOP per element, the same backward."""
    n = 3 * (q_elements + k_elements)
    return [Work("pointwise", n)], [Work("pointwise", n)]


def liger_cross_entropy(tokens: int, vocab: int) -> tuple[list[Work], list[Work]]:
    """Fused softmax cross-entropy over logits [T, V]: log-softmax (5 per logit) and the target
    pick; the gradient softmax - onehot (2 per logit) is computed in the forward pass by Liger,
    so the backward only scales it (1 per logit)."""
    n = tokens * vocab
    return ([Work("pointwise", n * (_c("_log_softmax") + 2)), Work("reduction", tokens)],
            [Work("pointwise", n)])


def liger_fused_linear_cross_entropy(tokens: int, hidden: int, vocab: int, *, bias: bool,
                                     weight_grad: bool) -> tuple[list[Work], list[Work]]:
    """lm_head GEMM + cross-entropy chunk by chunk, with the gradients (input, and weight when it
    is trained) computed in the forward pass: all booked in the forward call's phase... except that
    the backward GEMMs are backward work, so they are returned as backward and booked when
    autograd runs Liger's (trivial) backward."""
    lm_fwd, lm_bwd = linear_works(tokens, hidden, vocab, bias=bias, weight_grad=weight_grad)
    ce_fwd, ce_bwd = liger_cross_entropy(tokens, vocab)
    return lm_fwd + ce_fwd, lm_bwd + ce_bwd


def liger_kl_div(elements: int) -> tuple[list[Work], list[Work]]:
    """KL divergence y_true·(log y_true − y_pred) summed: exp, log, subtract, multiply, sum (5 per
    element); its gradient −y_true scaled by the upstream gradient (3 per element) in the backward."""
    return [Work("pointwise", 5 * elements)], [Work("pointwise", 3 * elements)]


# Generalised JSD over log-probabilities X (student) and Y (teacher), per element:
# p = exp(Y), q = exp(X) (2); m = β·p + (1−β)·q (3); log m (1); the two KL terms
# p·(Y − log m) and q·(X − log m), each subtract, multiply, scale (6); add and sum (2).
JSD_FORWARD = 14
# Liger computes the input gradient in the same forward kernel, dX = (1−β)·q·(X − log m) / T,
# reusing the loss's difference: multiply, scale, normalise (3 per element).
JSD_GRADIENT = 3


def liger_jsd(elements: int) -> tuple[list[Work], list[Work]]:
    """Liger's JSD over [T, V] log-probabilities: the loss and, in the same forward kernel, the
    input gradient; the backward only scales the stored gradient (1 per element)."""
    return [Work("pointwise", (JSD_FORWARD + JSD_GRADIENT) * elements)], [Work("pointwise", elements)]


def liger_fused_linear_jsd(tokens: int, student_hidden: int, teacher_hidden: int, vocab: int, *,
                           weight_grad: bool) -> tuple[list[Work], list[Work]]:
    """Both LM heads and the JSD chunk by chunk: the student's GEMM (its gradients are backward
    work, booked when autograd runs Liger's backward), the teacher's GEMM (no gradient), each
    model's temperature scale and log-softmax, and the JSD with its gradient."""
    student_fwd, student_bwd = linear_works(tokens, student_hidden, vocab, bias=False, weight_grad=weight_grad)
    n = tokens * vocab
    forward = [*student_fwd, Work("matmul", 2 * tokens * teacher_hidden * vocab),
               Work("pointwise", 2 * n * (1 + _c("_log_softmax"))), *liger_jsd(n)[0]]
    return forward, [*student_bwd, Work("pointwise", n)]


def tokens_of(shape, features: int) -> int:
    return math.prod(shape) // features if features else 0
