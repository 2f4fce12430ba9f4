"""Fused optimizers of DeepSpeed and apex, counted from the parameters they update.

They run their whole update inside a C++/CUDA extension (no aten op, nothing to see), so the
optimizer integration (integrations/deepspeed.py) books each ``step()`` with these formulas: the
per-element constants of torch's optimizers (constants.py) times the elements of the parameters
that have a gradient, per parameter group (group options such as SGD momentum matter).
"""
from __future__ import annotations

from .constants import PER_ELEMENT


def _c(name: str) -> int:
    return PER_ELEMENT[name].flops


def _adam(group) -> int:
    return _c("adam_step") + _c("adam_amsgrad") * bool(group.get("amsgrad"))


def _sgd(group) -> int:
    momentum = group.get("momentum", 0) or 0
    return (_c("sgd_step") + _c("sgd_weight_decay") * bool(group.get("weight_decay"))
            + _c("sgd_momentum") * bool(momentum) + _c("sgd_nesterov") * bool(group.get("nesterov") and momentum))


def _lamb(group) -> int:
    return _c("adam_step") + _c("trust_ratio")


# Optimizer class ('module.QualName') -> FLOP per updated element, from its parameter group.
PER_ELEMENT_BY_CLASS = {
    "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam": _adam,
    "deepspeed.ops.adam.fused_adam.FusedAdam": _adam,
    "deepspeed.ops.lamb.fused_lamb.FusedLamb": _lamb,
    "deepspeed.ops.adagrad.cpu_adagrad.DeepSpeedCPUAdagrad": lambda group: _c("adagrad_step"),
    "deepspeed.ops.lion.cpu_lion.DeepSpeedCPULion": lambda group: _c("lion_step"),
    "deepspeed.ops.lion.fused_lion.FusedLion": lambda group: _c("lion_step"),
    "apex.optimizers.fused_adam.FusedAdam": _adam,
    "apex.optimizers.fused_lamb.FusedLAMB": _lamb,
    "apex.optimizers.fused_sgd.FusedSGD": _sgd,
    "apex.optimizers.fused_adagrad.FusedAdagrad": lambda group: _c("adagrad_step"),
}


def optimizer_step_flops(class_name: str, groups) -> int | None:
    """FLOPs of one step of a fused optimizer; ``groups``: (group options, updated elements)
    pairs. None when the class has no formula (it is reported uncounted)."""
    per_element = PER_ELEMENT_BY_CLASS.get(class_name)
    if per_element is None:
        return None
    return sum(per_element(options) * elements for options, elements in groups)
