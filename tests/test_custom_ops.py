"""Custom ops (torch.library.custom_op): formulas from flopcount's registry and from torch's."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import register_flop_formula

import flopcount


@torch.library.custom_op("flopcount_ops::fused_rms_norm", mutates_args=())
def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)


@flopcount.register_formula(fused_rms_norm, category="norm")  # the CustomOpDef itself
def fused_rms_norm_flops(x_shape, w_shape, eps, *, out_shape):
    rows, cols = x_shape
    return 4 * rows * cols


@torch.library.custom_op("flopcount_ops::gated", mutates_args=())
def gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(gate)


@register_flop_formula(torch.ops.flopcount_ops.gated)  # torch's registry (FlopCounterMode's)
def gated_flops(x_shape, gate_shape, *, out_shape=None, **kwargs):
    return 5 * x_shape[0] * x_shape[1]


@torch.library.custom_op("flopcount_ops::topk_mask", mutates_args=())
def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    return x * (x >= x.topk(k, dim=-1).values[..., -1:])


@flopcount.register_formula(torch.ops.flopcount_ops.topk_mask, category="reduction", needs_values=True)
def topk_mask_flops(x, k, *, out):
    return x.numel() + int((out != 0).sum())  # one compare per element, one multiply per kept one


@torch.library.custom_op("flopcount_ops::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.exp()


def meter(**options):
    return flopcount.meter(backend="dispatch", **options)


def test_flopcount_formula_for_a_custom_op():
    x, w = torch.randn(6, 10), torch.randn(10)
    with meter() as m:
        fused_rms_norm(x, w, 1e-6)
        torch.ops.flopcount_ops.fused_rms_norm.default(x, w, 1e-6)
    summary = m.summary()
    assert summary["by_op"]["flopcount_ops.fused_rms_norm"] == {"flops": 2 * 4 * 6 * 10, "calls": 2}
    assert summary["by_category"]["norm"] == 2 * 4 * 6 * 10
    assert summary["hardware_flops"] == 2 * 4 * 6 * 10  # the op's inner aten ops are not seen twice


def test_torch_registered_formula_is_reused_as_other():
    x, g = torch.randn(3, 7), torch.randn(3, 7)
    with meter() as m:
        gated(x, g)
    summary = m.summary()
    assert summary["by_op"]["flopcount_ops.gated"] == {"flops": 5 * 3 * 7, "calls": 1}
    assert summary["by_category"]["other"] == 5 * 3 * 7
    assert summary["uncounted_ops"] == {}


def test_torch_formula_registered_after_a_first_lookup_is_found():
    @torch.library.custom_op("flopcount_ops::late", mutates_args=())
    def late(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    x = torch.randn(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with meter() as m:
            late(x)
    assert m.summary()["uncounted_ops"] == {"flopcount_ops.late": 1}
    register_flop_formula(torch.ops.flopcount_ops.late)(lambda x_shape, out_shape=None, **kw: 16)
    with meter() as m:
        late(x)
    assert m.summary()["by_op"]["flopcount_ops.late"]["flops"] == 16


def test_flopcount_formula_takes_precedence_over_torchs():
    @torch.library.custom_op("flopcount_ops::both", mutates_args=())
    def both(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    register_flop_formula(torch.ops.flopcount_ops.both)(lambda x_shape, out_shape=None, **kw: 1)
    flopcount.register_formula(both, lambda x_shape, *, out_shape: 2 * x_shape[0], category="pointwise")
    with meter() as m:
        both(torch.randn(9))
    assert m.summary()["by_category"]["pointwise"] == 18
    assert m.summary()["by_category"]["other"] == 0


def test_formula_with_values():
    x = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 0.5, 6.0, 7.0]])
    with meter() as m:
        topk_mask(x, 2)
    assert m.summary()["by_category"]["reduction"] == 8 + 4  # 8 compares, 2 kept per row


def test_custom_op_without_formula_is_uncounted_warned_once_and_strict_fails():
    x = torch.randn(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with meter() as m:
            mystery(x)
            mystery(x)
    assert m.summary()["uncounted_ops"] == {"flopcount_ops.mystery": 2}
    assert sum("flopcount_ops.mystery" in str(w.message) for w in caught) == 1
    with pytest.raises(flopcount.UncountedOpError, match="flopcount_ops.mystery"):
        with meter(strict=True):
            mystery(x)
