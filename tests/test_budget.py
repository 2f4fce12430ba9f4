"""The budget guard in plain loops: warn, then stop before the step that would cross.

Model: Linear 8 -> 8 without bias, batch 4, loss = output.sum(), SGD without momentum. Per step:
forward matmul 2*4*8*8, weight gradient 2*4*8*8 (the input needs none), the sum's reduction and
the SGD update (p += -lr * g: 2 FLOPs per parameter); every step does the same work.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import flopcount
from flopcount.budget import STOP, WARN, BudgetExceeded, BudgetWarning, budget_limit, decide
from flopcount.trace.reader import read_table


def make_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8)

    def one_step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    return one_step


def measure_step() -> int:
    one_step = make_loop()
    with flopcount.meter(backend="dispatch") as m:
        one_step()
        m.step()
        one_step()
        m.step()
    assert m.training_flops == 2 * m.last_step.training_flops
    return m.last_step.training_flops


def test_decide_stops_when_the_next_step_would_reach_the_limit():
    limit = Fraction(100)
    assert decide(60, 39, limit, 0.5, warned=False) == WARN
    assert decide(60, 39, limit, 0.5, warned=True) == "ok"
    assert decide(61, 39, limit, 0.5, warned=True) == STOP  # reaching the limit is already crossing it
    assert decide(10, 39, limit, 0.5, warned=False) == "ok"


def test_budget_fraction_of_the_threshold_and_absolute_flops():
    threshold = Fraction(10**23, 3)
    assert budget_limit(0.5, threshold) == threshold / 2
    assert budget_limit(1, threshold) == threshold
    assert budget_limit(2e21, threshold) == 2 * 10**21
    for bad in (0, -1, float("nan"), float("inf"), "1e21", True, None):
        with pytest.raises(ValueError, match="must be a fraction of the threshold"):
            budget_limit(bad, threshold)
    with pytest.raises(ValueError, match="budget_warn_at"):
        flopcount.meter(budget=0.5, budget_warn_at=1.5)


@pytest.mark.parametrize("steps", ["explicit", "optimizer hook"])
def test_plain_loop_stops_before_crossing_never_after(tmp_path, steps):
    per_step = measure_step()
    assert per_step > 2 * (2 * 4 * 8 * 8)  # two matmuls plus the reduction and the update
    budget = 3 * per_step + per_step // 2  # room for three steps, not four
    one_step = make_loop()
    with pytest.raises(BudgetExceeded) as stopped:
        with flopcount.meter(str(tmp_path / "trace"), backend="dispatch", budget=budget, budget_warn_at=0.5) as m:
            with pytest.warns(BudgetWarning, match="of the budget"):
                for _ in range(100):
                    one_step()
                    if steps == "explicit":
                        m.step()
    assert m.training_flops == 3 * per_step < budget <= m.training_flops + per_step
    assert stopped.value.total == 3 * per_step and stopped.value.forecast == per_step and stopped.value.step == 2
    assert "budget guard stopped training after step 2" in str(stopped.value)
    # Flushed before raising: the trace holds the three steps.
    assert read_table(str(tmp_path / "trace"), "steps").column("training_flops").to_pylist() == [per_step] * 3


def test_fraction_budget_uses_the_base_models_threshold():
    per_step = measure_step()
    base_flops = 3 * 10 * per_step  # threshold: a third of it, i.e. 10 steps; budget: 40% = 4 steps
    one_step = make_loop()
    with pytest.raises(BudgetExceeded):
        with flopcount.meter(backend="dispatch", base_model_flops=float(base_flops), budget=0.4) as m:
            for _ in range(100):
                one_step()
    assert m.training_flops == 3 * per_step  # a fourth step would reach 4 steps' worth exactly
    assert m.summary()["compliance"]["threshold_flops"] == 10 * per_step
