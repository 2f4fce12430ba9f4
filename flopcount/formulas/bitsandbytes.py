"""bitsandbytes (0.45+) torch.library ops: 4-bit and 8-bit matmuls, (de)quantization, optimizers.

Registered by qualified name: nothing from bitsandbytes is imported, and the entries match once
bitsandbytes defines its ops (docs/custom_kernels.md). Conventions:

- a quantized GEMM is a GEMM: ``gemm_4bit`` / ``gemv_4bit`` / ``int8_linear_matmul`` and the
  scaled int8 products count 2·m·k·n in ``matmul``, whatever the weight's storage precision;
- ``gemm_4bit`` / ``gemv_4bit`` also dequantize the weight they read (``dequantize_4bit`` per
  weight element, in ``pointwise``): the same work as the CUDA path, which calls
  ``dequantize_4bit`` and then an aten matmul;
- optimizers count the per-element constants of torch's optimizers (``adam_step``, ...), plus
  ``optimizer_8bit_state`` per element of each 8-bit state for the blockwise variants.
"""
from __future__ import annotations

import math

from ._shapes import numel
from .constants import PER_ELEMENT
from .registry import Work, formula

NS = "bitsandbytes::"


def _c(name: str) -> int:
    return PER_ELEMENT[name].flops


def _gemm(a_shape, n: int) -> int:
    """2·m·k·n for an input [..., k] times a weight [n, k]."""
    return 2 * math.prod(a_shape[:-1]) * a_shape[-1] * n


@formula(NS + "gemm_4bit", "matmul")
def gemm_4bit(a_shape, b_shape, shape_b, absmax_shape, blocksize, quant_type, bias=None, *args,
              out_shape=None, **kwargs) -> list[Work]:
    n, k = shape_b[0], math.prod(shape_b[1:])
    works = [Work("matmul", _gemm(a_shape, n)), Work("pointwise", n * k * _c("dequantize_4bit"))]
    if bias is not None:
        works.append(Work("pointwise", math.prod(a_shape[:-1]) * n))
    return works


@formula(NS + "gemv_4bit", "matmul")
def gemv_4bit(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs) -> list[Work]:
    n, k = shape_b[0], math.prod(shape_b[1:])
    return [Work("matmul", _gemm(a_shape, n)), Work("pointwise", n * k * _c("dequantize_4bit"))]


@formula(NS + "dequantize_4bit", "pointwise")
def dequantize_4bit(a_shape, absmax_shape, blocksize, quant_type, shape, *args, out_shape=None, **kwargs) -> int:
    return math.prod(shape) * _c("dequantize_4bit")


@formula(NS + "dequantize_blockwise", "pointwise")
def dequantize_blockwise(a_shape, *args, out_shape=None, **kwargs) -> int:
    return numel(a_shape) * _c("dequantize_blockwise")


@formula(NS + "quantize_4bit", "pointwise")
def quantize_4bit(a_shape, *args, out_shape=None, **kwargs) -> int:
    return numel(a_shape) * _c("quantize_4bit")


@formula(NS + "quantize_blockwise", "pointwise")
def quantize_blockwise(a_shape, *args, out_shape=None, **kwargs) -> int:
    return numel(a_shape) * _c("quantize_blockwise")


@formula(NS + "int8_linear_matmul", "matmul")
def int8_linear_matmul(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return _gemm(a_shape, b_shape[0])


def _dequant(elements: int, bias) -> int:
    return elements * (_c("int8_mm_dequant") + (bias is not None))


@formula(NS + "int8_mm_dequant", "pointwise")
def int8_mm_dequant(a_shape, row_stats, col_stats, dtype=None, bias=None, *, out_shape=None, **kwargs) -> int:
    return _dequant(numel(a_shape), bias)


@formula(NS + "int8_scaled_mm", "matmul")
def int8_scaled_mm(a_shape, b_shape, row_stats, col_stats, bias=None, dtype=None, *, out_shape=None,
                   **kwargs) -> list[Work]:
    m, n = math.prod(a_shape[:-1]), b_shape[0]
    return [Work("matmul", _gemm(a_shape, n)), Work("pointwise", _dequant(m * n, bias))]


@formula(NS + "int8_mixed_scaled_mm", "matmul")
def int8_mixed_scaled_mm(a_shape, ca_shape, cb_shape, sca, scb, outlier_cols=None, bias=None, *,
                         out_shape=None, **kwargs) -> list[Work]:
    """int8 product of the quantized input with the weight, plus the outlier columns' product in
    the input precision (LLM.int8()): 2·m·outliers·n more."""
    m, n = math.prod(a_shape[:-1]), cb_shape[0]
    outliers = numel(outlier_cols)
    return [Work("matmul", _gemm(ca_shape, n) + 2 * m * outliers * n), Work("pointwise", _dequant(m * n, bias))]


def _quant_per_element(name: str, threshold) -> int:
    return _c(name) + int(bool(threshold) and threshold > 0)


@formula(NS + "int8_vectorwise_quant", "pointwise")
def int8_vectorwise_quant(a_shape, threshold=0.0, *, out_shape=None, **kwargs) -> int:
    return numel(a_shape) * _quant_per_element("int8_vectorwise_quant", threshold)


@formula(NS + "int8_double_quant", "pointwise")
def int8_double_quant(a_shape, threshold=0.0, *, out_shape=None, **kwargs) -> int:
    return numel(a_shape) * _quant_per_element("int8_double_quant", threshold)


@formula(NS + "int8_vectorwise_dequant", "pointwise")
def int8_vectorwise_dequant(a_shape, stats, *, out_shape=None, **kwargs) -> int:
    return numel(a_shape) * _c("int8_vectorwise_dequant")


def update_per_element(optimizer_name: str, *, weight_decay: float = 0.0, max_unorm: float = 0.0,
                       gnorm_scale: float = 1.0) -> int:
    """FLOP per parameter element of one bitsandbytes update, with torch's optimizer constants."""
    decay = _c("sgd_weight_decay") * (weight_decay > 0)  # adam/lion/ademamix: inside their step
    base = {
        "adam": _c("adam_step"),
        "lamb": _c("adam_step"),
        "ademamix": _c("adam_step") + _c("ademamix_extra"),
        "momentum": _c("sgd_step") + _c("sgd_momentum") + decay,
        "lars": _c("sgd_step") + _c("sgd_momentum") + decay,
        "rmsprop": _c("rmsprop_step") + decay,
        "adagrad": _c("adagrad_step") + decay,
        "lion": _c("lion_step"),
    }[optimizer_name]
    return base + _c("trust_ratio") * (max_unorm > 0) + _c("grad_scale") * (gnorm_scale != 1.0)


@formula(NS + "optimizer_update_32bit", "pointwise")
def optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1,
                           beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, *args,
                           out_shape=None, **kwargs) -> int:
    return numel(p) * update_per_element(optimizer_name, weight_decay=weight_decay, max_unorm=max_unorm,
                                         gnorm_scale=gnorm_scale)


@formula(NS + "optimizer_update_8bit_blockwise", "pointwise")
def optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps,
                                    step, lr, qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale,
                                    *args, out_shape=None, **kwargs) -> int:
    states = numel(state1) + numel(state2)
    return (numel(p) * update_per_element(optimizer_name, weight_decay=weight_decay, gnorm_scale=gnorm_scale)
            + states * _c("optimizer_8bit_state"))
