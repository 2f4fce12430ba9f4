"""The benchmark floors (benchmarks/reference_step.py: observer_floor, dispatch_floor) pass every
op on unchanged, forward and backward, and leave nothing switched on after their block."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flopcount.capture import native

pytestmark = pytest.mark.skipif(native.load_error() is not None,
                                reason=f"native backend unavailable: {native.load_error()}")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _step(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5, requires_grad=True)
    loss = (layer(x).relu() ** 2).sum()
    loss.backward()
    return loss.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("kind", ["observer_floor", "dispatch_floor"])
def test_floor_passes_ops_through(kind):
    from reference_step import metering

    expected = _step()
    before = str(torch._C._dispatch_tls_local_include_set())
    with metering(kind):
        got = _step()
        inside = str(torch._C._dispatch_tls_local_include_set())
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert ("GenericMode" in inside) == (kind == "dispatch_floor")
    assert str(torch._C._dispatch_tls_local_include_set()) == before


def test_unhooked_baseline_takes_out_flopcount_hooks_for_its_block():
    """baseline_unhooked: a job without flopcount, inside a process where a meter already
    registered the process-wide module hooks (they stay); they are back after the block."""
    import flopcount
    from reference_step import metering
    from torch.nn.modules import module

    from flopcount.capture.context import MODULE_HOOKS

    with flopcount.meter(backend="dispatch", warn=False):
        pass

    def ours():
        return [h for d in (module._global_forward_pre_hooks, module._global_forward_hooks)
                for h in d.values() if getattr(h, "__self__", None) is MODULE_HOOKS]

    assert len(ours()) == 2
    with metering("baseline_unhooked"):
        assert ours() == []
        expected = _step()
    assert len(ours()) == 2
    with flopcount.meter(backend="dispatch", warn=False) as m:  # the hooks still track modules
        torch.manual_seed(0)
        torch.nn.Sequential(torch.nn.Linear(5, 3))(torch.randn(4, 5))
    assert m.summary()["by_module"] == {"0": 2 * 4 * 5 * 3 + 4 * 3}  # addmm: the product and the bias
    assert torch.equal(expected[0], _step()[0])
