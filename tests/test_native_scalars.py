"""Float scalars that a formula never reads stay out of the native backend's keys
(Formula.reads_scalars, csrc kNoScalars): AdamW's step size changes every step, and without this
every step made new keys, each evaluated, booked and kept for the rest of the job."""
from __future__ import annotations

import math

import pytest
import torch

import flopcount
from flopcount.capture import native
from flopcount.capture.native.capture import classify
from flopcount.capture.native.decode import canonical_arguments, tags
from flopcount.formulas import REGISTRY, Formula
from flopcount.formulas.constants import PER_ELEMENT

pytestmark = pytest.mark.skipif(native.load_error() is not None,
                                reason=f"native backend unavailable: {native.load_error()}")
aten = torch.ops.aten


def test_table_formulas_read_no_scalars_and_others_keep_them():
    lib = native.load()
    K = lib.Klass

    def klass(op):
        return classify(lib, op, REGISTRY.lookup(op)[1])

    assert klass(aten.addcdiv_.default) == K.FORMULA_SHAPES  # AdamW's value=-step_size
    assert klass(aten.lerp_.Scalar) == K.FORMULA_SHAPES
    assert klass(aten.mul.Scalar) == K.FORMULA_SHAPES
    assert klass(aten.add.Tensor) == K.FORMULA  # alpha != 1 is one more operation per element
    assert klass(aten.mm.default) == K.FORMULA
    assert klass(aten._grouped_mm.default) == K.FORMULA_VALUES


def test_only_the_per_element_table_is_marked():
    # A formula marked reads_scalars=False would see NaN for its float scalars under the native
    # backend: only the table's shape-only makers (pointwise.py) may carry the mark.
    makers = {"per_output", "per_input", "per_source", "per_target"}
    marked = [entry for entry in REGISTRY._table.values()
              if isinstance(entry, Formula) and not entry.reads_scalars]
    assert marked
    assert {entry.fn.__qualname__.split(".")[0] for entry in marked} == makers
    assert all(entry.fn(torch.Size([3, 4]), math.nan, out_shape=(3, 4)) == entry.fn(
        torch.Size([3, 4]), 0.25, out_shape=(3, 4)) for entry in marked)


def test_canonical_arguments_drop_scalars_only_when_asked():
    lib = native.load()
    t = tags(lib)
    bits = 4607182418800017408  # 1.0
    # op id, context, flags, backward module | default flag, tensor (2, 3) | default flag, 1.0 | outputs
    with_scalar = (0, 0, 1, -1, 0, t.TENSOR, 2, 2, 3, 0, t.DOUBLE, bits, t.OUTPUTS, t.TENSOR, 2, 2, 3)
    not_kept = (0, 0, 1, -1, 0, t.TENSOR, 2, 2, 3, 0, t.SCALAR_NOT_KEPT, t.OUTPUTS, t.TENSOR, 2, 2, 3)
    assert canonical_arguments(with_scalar, t, False, keep_scalars=False) == \
        canonical_arguments(not_kept, t, False, keep_scalars=False)
    assert canonical_arguments(with_scalar, t, False) != canonical_arguments(not_kept, t, False)


def _adamw_steps(backend: str, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(5, 8)
    keys = []
    with flopcount.meter(backend=backend, warn=False) as m:
        records = []
        for _ in range(steps):
            model(x).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            records.append(m.step())
            keys.append(len(getattr(m.capture, "keys", ())))
    return model, m, records, keys


def test_adamw_steps_repeat_their_keys_and_count_the_same():
    steps = 6
    model, m, records, keys = _adamw_steps("native", steps)
    _, d, dispatch_records, _ = _adamw_steps("dispatch", steps)
    elements = sum(p.numel() for p in model.parameters())
    params = len(list(model.parameters()))
    addcdiv = PER_ELEMENT["addcdiv"].flops
    for record in records:  # param.addcdiv_(exp_avg, denom, value=-step_size): once per parameter
        flops = sum(f for (phase, _, _, op), f in record.flops.items()
                    if phase == "optimizer" and op == "aten.addcdiv_")
        assert flops == addcdiv * elements == 3 * elements
        assert record.calls[("aten.addcdiv_", "optimizer")] == params
    # Once the steps repeat, no step adds a key: the step size's changing value is not in them.
    assert keys[2] == keys[-1]
    assert m.summary()["by_phase"] == d.summary()["by_phase"]
    assert m.summary()["by_op"]["aten.addcdiv_"] == d.summary()["by_op"]["aten.addcdiv_"]


@torch.library.custom_op("flopcount_scalars::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return x + alpha * y


@scaled_add.register_fake
def _(x, y, alpha):
    return torch.empty_like(x)


def _scaled_add_flops(x_shape, y_shape, alpha, *, out_shape):
    return 2 * math.prod(out_shape)  # one multiply and one add per element, whatever alpha is


def _scaled_add_steps(backend: str, steps: int):
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    keys = []
    with flopcount.meter(backend=backend, warn=False) as m:
        for step in range(steps):
            scaled_add(x, y, 0.5 + step / 7)  # a new float every step, like a scheduled learning rate
            m.step()
            keys.append(len(getattr(m.capture, "keys", ())))
    return m.summary(), keys


@pytest.mark.parametrize("reads_scalars", [False, True])
def test_a_user_formula_that_reads_no_scalars_keeps_the_native_keys_flat(reads_scalars):
    op = torch.ops.flopcount_scalars.scaled_add.default
    flopcount.register_formula(op, _scaled_add_flops, category="pointwise", reads_scalars=reads_scalars,
                               override=True)
    try:
        assert classify(native.load(), op, REGISTRY.lookup(op)[1]) == (
            native.load().Klass.FORMULA if reads_scalars else native.load().Klass.FORMULA_SHAPES)
        steps = 6
        summary, keys = _scaled_add_steps("native", steps)
        dispatch, _ = _scaled_add_steps("dispatch", steps)
        expected = steps * 2 * 4 * 6
        assert summary["by_op"]["flopcount_scalars.scaled_add"] == {"flops": expected, "calls": steps}
        assert summary["hardware_flops"] == expected
        assert summary["by_phase"] == dispatch["by_phase"] and summary["by_op"] == dispatch["by_op"]
        if reads_scalars:  # the safe default: every new float is a new key
            assert keys == list(range(1, steps + 1)), keys
        else:  # the first call is keyed before its op is classified, with its scalar; none after it
            assert keys == [1] + [2] * (steps - 1), keys
    finally:  # leave the registry as it was for the rest of the session: no user formula marked
        flopcount.register_formula(op, _scaled_add_flops, category="pointwise", override=True)
