"""Steps are the trainer's optimizer steps; work after the last one is trailing; the meter's
failures inside hooks never reach the training loop.

Model: Linear 16 -> 32 (no bias), ReLU, Linear 32 -> 4 (no bias), batch 8. Matmul FLOPs of one
forward: 2*8*(16*32 + 32*4); its backward computes both weight gradients and the second Linear's
input gradient (the data needs none): the forward again plus 2*8*32*4.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flopcount
from flopcount.trace.reader import read_trace

B, D_IN, D_HID, D_OUT = 8, 16, 32, 4
FORWARD = 2 * B * (D_IN * D_HID + D_HID * D_OUT)
BACKWARD = FORWARD + 2 * B * D_HID * D_OUT


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID, bias=False), torch.nn.ReLU(),
                               torch.nn.Linear(D_HID, D_OUT, bias=False))


def train(m, model, opt, steps, *, explicit=False, x=None):
    x = torch.randn(B, D_IN) if x is None else x
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if explicit:
            m.step(samples=B)
    return x


@pytest.mark.parametrize("explicit", [False, True])
def test_final_evaluation_is_trailing_work_not_a_step(tmp_path, backend, explicit):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with flopcount.meter(tmp_path / "run", backend=backend, warn=False) as m:
        x = train(m, model, opt, 5, explicit=explicit)
        with torch.no_grad():  # the final evaluation, after the last optimizer step
            model(x)
    live = m.summary()
    written = flopcount.summarize(tmp_path / "run")
    for summary in (live, written):
        assert summary["steps"] == 5
        assert summary["by_phase_category"]["eval"]["matmul"] == FORWARD  # still counted, in its phase
        assert summary["by_phase_category"]["forward"]["matmul"] == 5 * FORWARD
        assert summary["trailing_flops"] == summary["by_phase"]["eval"]
    rows = read_trace(tmp_path / "run")
    assert rows["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert rows["trailing"].tolist() == [False] * 5 + [True]
    assert rows["phase_eval"].tolist()[-1] == written["by_phase"]["eval"]
    assert int(rows["hardware_flops"].sum()) == written["hardware_flops"]  # the totals include it


def test_step_after_the_final_evaluation_is_not_a_training_step(backend):
    """The demo's pattern: step() after each optimizer step, then an evaluation closed by step()."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with flopcount.meter(backend=backend, warn=False) as m:
        x = train(m, model, opt, 3, explicit=True)
        with torch.no_grad():
            model(x)
        record = m.step()
    assert record.trailing and m.summary()["steps"] == 3
    assert m.summary()["by_phase_category"]["eval"]["matmul"] == FORWARD


def test_loops_without_torch_optim_count_every_step_call(backend):
    w = torch.randn(D_IN, D_OUT, requires_grad=True)
    with flopcount.meter(backend=backend, warn=False) as m:
        for _ in range(3):
            (torch.randn(B, D_IN) @ w).sum().backward()
            with torch.no_grad():
                w -= 0.1 * w.grad
            w.grad = None
            m.step()
    assert m.summary()["steps"] == 3


def test_gradient_accumulation_with_auto_steps(backend):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, D_IN)
    with flopcount.meter(backend=backend, warn=False) as m:
        for micro_batch in range(6):
            model(x).pow(2).mean().backward()
            if micro_batch % 3 == 2:
                opt.step()
                opt.zero_grad()
    summary = m.summary()
    assert summary["steps"] == 2 and summary["trailing_flops"] == 0
    assert summary["by_phase_category"]["forward"]["matmul"] == 6 * FORWARD


# ---- the meter never breaks training ----------------------------------------------------------

@torch.library.custom_op("flopcount_steps::scale", mutates_args=())
def scale(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@scale.register_fake
def _(x):
    return torch.empty_like(x)


def _scale_backward(ctx, grad):
    return grad * 2


scale.register_autograd(_scale_backward)


class Scaled(torch.nn.Module):
    def forward(self, x):
        return scale(x)


@pytest.fixture
def failing_formula():
    """Registers a formula for flopcount_steps::scale that does what the test says, then removes it."""
    from flopcount.formulas import REGISTRY

    op = torch.ops.flopcount_steps.scale.default

    def install(fn):
        flopcount.register_formula(op, fn, category="pointwise")

    yield install
    REGISTRY._table.pop(op, None)
    REGISTRY.version += 1


@pytest.mark.parametrize("failure", ["formula raises", "booking fails"])
def test_a_failing_formula_or_booking_never_reaches_the_training_loop(backend, failing_formula, failure):
    def raises(x_shape, *, out_shape):
        raise ZeroDivisionError("a broken formula")

    def malformed(x_shape, *, out_shape):
        return [x_shape[0] * x_shape[1]]  # bare ints, not Work items: booking them fails

    failing_formula(raises if failure == "formula raises" else malformed)
    model = torch.nn.Sequential(mlp(), Scaled())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with flopcount.meter(backend=backend) as m:
            train(m, model, opt, 3)
    summary = m.summary()
    # Training went on; the op's FLOPs are reported as uncounted (forward calls; its backward is
    # aten.mul), the rest is counted exactly.
    assert summary["steps"] == 3
    assert summary["uncounted_ops"] == {"flopcount_steps.scale": 3}
    assert summary["by_phase_category"]["forward"]["matmul"] == 3 * FORWARD
    assert summary["by_phase_category"]["backward"]["matmul"] == 3 * BACKWARD
    messages = [str(w.message) for w in caught if "flopcount_steps" in str(w.message) or "meter failed" in str(w.message)]
    if failure == "booking fails":
        assert summary["meter_errors"]["booking"]["count"] >= 1
        assert sum("meter failed in booking" in msg for msg in messages) == 1  # once per kind
    else:
        assert summary["meter_errors"] == {}
        assert sum("formula failed" in msg for msg in messages) == 1


class BrokenOutput:
    """A model output whose tuple view raises (as a buggy ModelOutput would)."""

    def __init__(self, value):
        self.value = value

    def to_tuple(self):
        raise RuntimeError("to_tuple is broken")


class Wrapper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return BrokenOutput(self.net(x))


def test_a_failing_module_hook_never_reaches_the_training_loop(tmp_path, backend):
    model = Wrapper()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, D_IN)
    with pytest.warns(UserWarning, match="meter failed in module hook"):
        with flopcount.meter(tmp_path / "run", backend=backend) as m:
            for _ in range(2):
                model(x).value.pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
    summary = m.summary()
    assert summary["steps"] == 2
    assert summary["by_phase_category"]["forward"]["matmul"] == 2 * FORWARD
    assert summary["by_phase_category"]["backward"]["matmul"] == 2 * BACKWARD
    assert summary["meter_errors"]["module hook"] == {"count": 2, "first": "RuntimeError: to_tuple is broken"}
    assert flopcount.summarize(tmp_path / "run")["meter_errors"] == summary["meter_errors"]  # in the trace


def test_budget_exceeded_still_reaches_the_loop(backend):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(flopcount.BudgetExceeded):
        with flopcount.meter(backend=backend, warn=False, budget=10 * FORWARD) as m:
            train(m, model, opt, 100)
    assert m.summary()["meter_errors"] == {}
