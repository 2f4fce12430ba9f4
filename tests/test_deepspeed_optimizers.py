"""DeepSpeed's fused optimizers (DS_ACCELERATOR=cpu): counted at step() from the parameters they
update, with torch's per-element optimizer constants (formulas/deepspeed.py)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

import flopcount  # noqa: E402
from flopcount.formulas.constants import PER_ELEMENT  # noqa: E402
from flopcount.formulas.deepspeed import optimizer_step_flops  # noqa: E402

ADAM = PER_ELEMENT["adam_step"].flops


def built(builder_name: str) -> bool:
    """DeepSpeed JIT-compiles each op's extension on first use (minutes): use it when it exists."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    return any(f.startswith(builder_name) and f.endswith(".so") for _, _, files in os.walk(root) for f in files)


def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    net[1].bias.requires_grad_(False)  # no gradient: not updated, not counted
    return net


@pytest.mark.parametrize("name, builder", [("DeepSpeedCPUAdam", "cpu_adam"), ("FusedAdam", "fused_adam")])
def test_fused_adam_counted_from_updated_parameters(backend, name, builder):
    import deepspeed.ops.adam as ds_adam

    if not built(builder):
        pytest.skip(f"DeepSpeed's {builder} extension is not built here (minutes to JIT-compile)")
    net = model()
    optimizer = getattr(ds_adam, name)([p for p in net.parameters() if p.requires_grad], lr=0.1)
    qualified = f"{type(optimizer).__module__}.{name}.step"
    with flopcount.meter(backend=backend, strict=True) as m:
        for _ in range(2):
            net(torch.randn(3, 8)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    s = m.summary()
    elements = 8 * 4 + 4 + 4 * 2  # net[1].bias has no gradient
    assert s["uncounted_ops"] == {}
    assert s["steps"] == 2
    assert s["by_op"][qualified] == {"flops": 2 * elements * ADAM, "calls": 2}
    assert s["by_phase_category"]["optimizer"]["pointwise"] >= 2 * elements * ADAM
    assert s["by_module"]["<none>"] >= 2 * elements * ADAM


def test_fused_lamb_and_unknown_classes():
    lamb = "deepspeed.ops.lamb.fused_lamb.FusedLamb"
    per = PER_ELEMENT["adam_step"].flops + PER_ELEMENT["trust_ratio"].flops
    assert optimizer_step_flops(lamb, [({}, 10), ({"weight_decay": 0.1}, 5)]) == 15 * per
    sgd = "apex.optimizers.fused_sgd.FusedSGD"
    c = {k: PER_ELEMENT[k].flops for k in ("sgd_step", "sgd_momentum", "sgd_nesterov", "sgd_weight_decay")}
    assert optimizer_step_flops(sgd, [({"momentum": 0.9, "nesterov": True}, 4)]) == 4 * (
        c["sgd_step"] + c["sgd_momentum"] + c["sgd_nesterov"])
    assert optimizer_step_flops("deepspeed.ops.adam.Unknown", [({}, 4)]) is None


def test_fused_optimizer_without_formula_is_uncounted():
    """A class from DeepSpeed's ops package without a formula is still reported, never zero."""
    opaque = type("OpaqueOptimizer", (torch.optim.SGD,), {"__module__": "deepspeed.ops.fake"})
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = opaque([p], lr=0.1)
    with flopcount.meter(backend="dispatch", warn=False) as m:
        (p * p).sum().backward()
        optimizer.step()
    assert m.summary()["uncounted_ops"] == {"deepspeed.ops.fake.OpaqueOptimizer.step": 1}
