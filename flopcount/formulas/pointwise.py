"""Elementwise, activation, softmax, reduction, loss and scatter ops: per-element constants.

Every op named in constants.PER_ELEMENT with ``counts`` output/input/source/target is registered
here, together with its in-place (``op_``) and ``_foreach_op`` / ``_foreach_op_`` variants.
"""
from __future__ import annotations

import torch

from ._shapes import first_shape, numel
from .constants import PER_ELEMENT
from .registry import REGISTRY, Formula, formula

aten = torch.ops.aten


def _output_elements(args, out_shape) -> int:
    # In-place _foreach_ ops return nothing: their first argument is what they write.
    if out_shape is None or (isinstance(out_shape, (list, tuple)) and len(out_shape) == 0):
        return numel(args[0]) if args and isinstance(args[0], (list, tuple)) else 0
    return numel(out_shape) if isinstance(out_shape, list) else numel(first_shape(out_shape))


def per_output(constant: int):
    def fn(*args, out_shape=None, **kwargs) -> int:
        return constant * _output_elements(args, out_shape)
    return fn


def per_input(constant: int):
    def fn(*args, out_shape=None, **kwargs) -> int:
        return constant * numel(args[0])
    return fn


def per_source(constant: int):
    # index_add(self, dim, index, source), scatter_add(self, dim, index, src),
    # scatter_reduce(self, dim, index, src, reduce), embedding_dense_backward(grad_output, ...).
    def fn(*args, out_shape=None, **kwargs) -> int:
        if len(args) >= 4 and isinstance(args[3], tuple):
            return constant * numel(args[3])
        for key in ("source", "src"):
            if isinstance(kwargs.get(key), tuple):
                return constant * numel(kwargs[key])
        return constant * numel(args[0])
    return fn


def per_target(constant: int):
    # nll_loss_forward(self, target, ...), nll_loss_backward(grad_output, self, target, ...)
    def fn(*args, out_shape=None, **kwargs) -> int:
        shapes = [a for a in args if isinstance(a, tuple) and all(isinstance(d, int) for d in a)]
        target = shapes[1] if len(shapes) >= 2 and len(shapes[0]) > len(shapes[1]) else None
        if target is None:  # backward: (grad_output, self, target, weight?, total_weight)
            target = shapes[2] if len(shapes) >= 3 else shapes[-1]
        return constant * numel(target)
    return fn


_MAKERS = {"output": per_output, "input": per_input, "source": per_source, "target": per_target}


def _variants(name: str):
    for candidate in (name, name + "_", "_foreach_" + name, "_foreach_" + name + "_"):
        if hasattr(aten, candidate):
            yield getattr(aten, candidate)


# The table's formulas read shapes only: float scalars (alpha, value, weight, p) never change them.
for _name, _row in PER_ELEMENT.items():
    if _row.counts in _MAKERS:
        _fn = _MAKERS[_row.counts](_row.flops)
        for _op in _variants(_name):
            REGISTRY.add(_op, Formula(_fn, _row.category, reads_scalars=False))


_ADD_SUB = [op for name in ("add", "sub") for op in _variants(name)]


@formula(_ADD_SUB, "pointwise", override=True)  # replaces the table row: alpha != 1 scales
def add_sub_flops(*args, out_shape=None, alpha=1, **kwargs) -> int:
    # a + alpha*b: the scaling is one more operation per element unless alpha is 1.
    return (1 + (alpha != 1)) * _output_elements(args, out_shape)


@formula([aten.gelu, aten.gelu_], "pointwise", override=True)  # the table row, by approximate
def gelu_flops(x_shape, *args, out_shape=None, approximate="none", **kwargs) -> int:
    name = "gelu_tanh" if (args[:1] or (approximate,))[0] == "tanh" else "gelu"
    return PER_ELEMENT[name].flops * numel(x_shape)


@formula(aten.gelu_backward, "pointwise", override=True)  # the table row, by approximate
def gelu_backward_flops(grad_shape, x_shape, *args, out_shape=None, approximate="none", **kwargs) -> int:
    name = "gelu_tanh_backward" if (args[:1] or (approximate,))[0] == "tanh" else "gelu_backward"
    return PER_ELEMENT[name].flops * numel(x_shape)


@formula([aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index_put], "pointwise")
def index_put_flops(self_shape, indices, values_shape, accumulate=False, *args, out_shape=None, **kwargs) -> int:
    # Without accumulate it is a copy (zero); with it, one add per written value.
    if not (kwargs.get("accumulate", accumulate)):
        return 0
    return PER_ELEMENT["index_put_accumulate"].flops * numel(values_shape)


@formula(aten._unsafe_masked_index_put_accumulate, "pointwise")
def masked_index_put_accumulate_flops(self_shape, mask_shape, indices, values_shape, *args, out_shape=None,
                                      **kwargs) -> int:
    # Inductor's decomposition of an accumulating index_put: one add per value.
    return PER_ELEMENT["index_put_accumulate"].flops * numel(values_shape)
