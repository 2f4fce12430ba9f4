"""Layer / RMS / group / batch normalisation, forward and backward (category `norm`).

Per normalised element: the forward statistics and scaling (layer_norm_forward or
rms_norm_forward), plus norm_affine per present weight/bias. Backward counts only the gradients
that output_mask requests: input, weight, bias. Constants: constants.PER_ELEMENT.
"""
from __future__ import annotations

import torch

from ._shapes import numel
from .constants import PER_ELEMENT
from .registry import formula

aten = torch.ops.aten

C = {name: PER_ELEMENT[name].flops for name in (
    "layer_norm_forward", "norm_affine", "layer_norm_backward_input", "norm_backward_weight",
    "norm_backward_bias", "rms_norm_forward", "rms_norm_backward_input", "batch_norm_eval")}
AFFINE_EACH = C["norm_affine"] // 2  # one multiply (weight) or one add (bias)


def _present(*shapes) -> int:
    return sum(1 for s in shapes if isinstance(s, tuple))


def backward_flops(n: int, mask, input_constant: int) -> int:
    grad_input, grad_weight, grad_bias = (list(mask) + [False] * 3)[:3]
    return n * (input_constant * bool(grad_input) + C["norm_backward_weight"] * bool(grad_weight)
                + C["norm_backward_bias"] * bool(grad_bias))


@formula(aten.native_layer_norm, "norm")
def layer_norm(x_shape, normalized_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kwargs) -> int:
    return numel(x_shape) * (C["layer_norm_forward"] + AFFINE_EACH * _present(weight_shape, bias_shape))


@formula(aten.native_layer_norm_backward, "norm")
def layer_norm_backward(grad_shape, x_shape, normalized_shape, mean, rstd, weight, bias, output_mask,
                        *, out_shape=None, **kwargs) -> int:
    return backward_flops(numel(x_shape), output_mask, C["layer_norm_backward_input"])


@formula(aten.native_group_norm, "norm")
def group_norm(x_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kwargs) -> int:
    return numel(x_shape) * (C["layer_norm_forward"] + AFFINE_EACH * _present(weight_shape, bias_shape))


@formula(aten.native_group_norm_backward, "norm")
def group_norm_backward(grad_shape, x_shape, mean, rstd, weight, n, c, hxw, group, output_mask,
                        *, out_shape=None, **kwargs) -> int:
    return backward_flops(numel(x_shape), output_mask, C["layer_norm_backward_input"])


_RMS = [getattr(aten, n) for n in ("_fused_rms_norm",) if hasattr(aten, n)]
_RMS_BWD = [getattr(aten, n) for n in ("_fused_rms_norm_backward",) if hasattr(aten, n)]


@formula(_RMS, "norm")
def rms_norm(x_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return numel(x_shape) * (C["rms_norm_forward"] + AFFINE_EACH * _present(weight_shape))


@formula(_RMS_BWD, "norm")
def rms_norm_backward(grad_shape, x_shape, normalized_shape, rstd, weight, output_mask, *,
                      out_shape=None, **kwargs) -> int:
    return backward_flops(numel(x_shape), list(output_mask) + [False], C["rms_norm_backward_input"])


_BATCH_NORM = [getattr(aten, n) for n in ("native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm",
                                          "miopen_batch_norm", "_batch_norm_with_update") if hasattr(aten, n)]
_BATCH_NORM_EVAL = [getattr(aten, n) for n in ("_native_batch_norm_legit_no_training", "_batch_norm_no_update")
                    if hasattr(aten, n)]


@formula(_BATCH_NORM, "norm")
def batch_norm(x_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kwargs) -> int:
    # Training computes batch statistics (as layer norm); eval uses running statistics.
    training = next((a for a in args if isinstance(a, bool)), True)
    return batch_norm_flops(x_shape, weight_shape, bias_shape, training)


@formula(_BATCH_NORM_EVAL, "norm")
def batch_norm_eval(x_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kwargs) -> int:
    return batch_norm_flops(x_shape, weight_shape, bias_shape, training=False)


def batch_norm_flops(x_shape, weight_shape, bias_shape, training: bool) -> int:
    stats = C["layer_norm_forward"] if training else C["batch_norm_eval"]
    return numel(x_shape) * (stats + AFFINE_EACH * _present(weight_shape, bias_shape))


_BATCH_NORM_BWD = [getattr(aten, n) for n in ("native_batch_norm_backward", "cudnn_batch_norm_backward",
                                              "miopen_batch_norm_backward", "batch_norm_backward")
                   if hasattr(aten, n)]


@formula(_BATCH_NORM_BWD, "norm")
def batch_norm_backward(grad_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    mask = kwargs.get("output_mask") or next(
        (a for a in reversed(args) if isinstance(a, (list, tuple)) and len(a) == 3
         and all(isinstance(m, bool) for m in a)), (True, True, True))
    return backward_flops(numel(x_shape), mask, C["layer_norm_backward_input"])
