"""Fused optimizer kernels (per parameter element). foreach / for-loop implementations run
ordinary pointwise ops and are counted op by op."""
from __future__ import annotations

import torch

from ._shapes import numel
from .constants import PER_ELEMENT
from .registry import formula

aten = torch.ops.aten


def _c(name: str) -> int:
    return PER_ELEMENT[name].flops


def _ops(*names):
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


@formula(_ops("_fused_adamw_", "_fused_adam_", "_fused_adamw", "_fused_adam"), "pointwise")
def fused_adam(params, *args, out_shape=None, amsgrad=False, **kwargs) -> int:
    return numel(list(params)) * (_c("adam_step") + _c("adam_amsgrad") * bool(amsgrad))


@formula(_ops("_fused_sgd_", "_fused_sgd"), "pointwise")
def fused_sgd(params, *args, out_shape=None, weight_decay=0.0, momentum=0.0, nesterov=False, **kwargs) -> int:
    per_element = (_c("sgd_step") + _c("sgd_weight_decay") * (weight_decay != 0)
                   + _c("sgd_momentum") * (momentum != 0) + _c("sgd_nesterov") * bool(nesterov and momentum))
    return numel(list(params)) * per_element


@formula(_ops("_fused_adagrad_", "_fused_adagrad"), "pointwise")
def fused_adagrad(params, *args, out_shape=None, **kwargs) -> int:
    return numel(list(params)) * _c("adagrad_step")
