"""Convolutions: 2 x (output elements) x (C_in / groups) x (kernel elements), category `conv`.

For a transposed convolution the roles of input and output swap: 2 x (input elements) x
(C_out / groups) x (kernel elements). Backward counts the input-gradient and weight-gradient
convolutions that output_mask requests (each costs the forward's GEMM work); the bias gradient
is a sum over grad_output (reduction). The forward bias add is pointwise, like addmm's.
"""
from __future__ import annotations

import math

import torch

from ._shapes import numel
from .registry import Work, formula

aten = torch.ops.aten


def conv_gemm_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    # Weight: [C_out, C_in/groups, *k] (transposed: [C_in, C_out/groups, *k]).
    per_output = w_shape[1] * math.prod(w_shape[2:])
    return 2 * (numel(x_shape) if transposed else numel(out_shape)) * per_output


@formula([aten.convolution, aten._convolution, aten.cudnn_convolution, aten.convolution_overrideable,
          aten._slow_conv2d_forward, aten.mkldnn_convolution], "conv")
def convolution(x_shape, w_shape, bias_shape=None, stride=None, padding=None, dilation=None,
                transposed=False, *args, out_shape=None, **kwargs) -> list[Work]:
    if not isinstance(transposed, bool):  # cudnn/mkldnn variants have no `transposed` argument
        transposed = False
    out = out_shape[0] if out_shape and isinstance(out_shape[0], tuple) else out_shape
    work = [Work("conv", conv_gemm_flops(x_shape, w_shape, out, transposed))]
    if isinstance(bias_shape, tuple):
        work.append(Work("pointwise", numel(out)))
    return work


@formula([aten.convolution_backward], "conv")
def convolution_backward(grad_out_shape, x_shape, w_shape, bias_sizes, stride, padding, dilation,
                         transposed, output_padding, groups, output_mask, *, out_shape=None, **kwargs) -> list[Work]:
    gemm = conv_gemm_flops(x_shape, w_shape, grad_out_shape, transposed)
    work = [Work("conv", gemm)] * (int(output_mask[0]) + int(output_mask[1]))
    if output_mask[2]:
        work.append(Work("reduction", numel(grad_out_shape)))
    return work
