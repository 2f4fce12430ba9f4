"""MeterConfig lists the meter's options once: the Meter, `flopcount run` (its command-line
options and the environment of its processes) and the callbacks derive from it; the Meter alone
decides when a budget stops training (``budget_action``)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import warnings

import pytest
import torch

import flopcount
from flopcount.budget import BudgetExceeded
from flopcount.cli import add_run
from flopcount.config import MeterConfig, cli_options, run_options
from flopcount.integrations.launcher import ENV_VAR, child_env

M, K, N = 4, 8, 6
MM = 2 * M * K * N


def test_the_meter_takes_exactly_the_config_fields():
    fields = [f.name for f in dataclasses.fields(MeterConfig)]
    params = list(inspect.signature(flopcount.Meter).parameters)
    assert params == [*fields, "config"]  # out first, then every option, then config itself
    for f in dataclasses.fields(MeterConfig):
        assert f.metadata["doc"], f.name


def test_meter_options_are_the_configs():
    m = flopcount.meter(backend="dispatch", flush_every=7, module_depth=2)
    assert m.config == MeterConfig(backend="dispatch", flush_every=7, module_depth=2)
    assert (m.flush_every, m.module_depth, m.requested_backend) == (7, 2, "dispatch")
    given = MeterConfig(backend="dispatch", run_id="r1")
    assert flopcount.Meter(config=given).config is given
    assert flopcount.Meter("some/dir", config=given).config == given.replace(out="some/dir")


@pytest.mark.parametrize("options, message", [
    ({"backend": "gpu"}, "backend='gpu' is not one of auto, dispatch, native"),
    ({"module_depth": 0}, "module_depth=0 must be a positive integer or None"),
    ({"flush_every": "5"}, "flush_every='5' must be a positive integer"),
    ({"sync_every": 0}, "sync_every=0 must be a positive integer or None"),
    ({"budget_action": "pause"}, "budget_action='pause' is not one of raise, stop"),
    ({"budget": 0.5, "budget_warn_at": 0}, "budget_warn_at=0 must be a fraction"),
    ({"budget": -1}, "budget=-1 must be a fraction of the threshold"),
])
def test_bad_options_are_one_line_errors_from_the_config_and_the_meter(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MeterConfig(**options)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flopcount.meter(**options)


def test_the_config_is_frozen():
    config = MeterConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.strict = True


def test_flopcount_run_passes_the_configs_run_options(tmp_path):
    assert set(run_options()) == {"backend", "base_model", "base_model_flops", "strict", "module_depth", "run_id",
                                  "flush_every", "budget", "budget_warn_at"}
    env = child_env(str(tmp_path), {"strict": True, "budget": 0.5, "warn": False, "track_modules": False},
                    environ={})
    passed = json.loads(env[ENV_VAR])
    assert passed == {"out": str(tmp_path), "strict": True, "budget": 0.5}
    MeterConfig(**passed)  # what a process gets is a valid config


def test_the_run_commands_options_come_from_the_config():
    parser = argparse.ArgumentParser()
    add_run(parser)
    args = parser.parse_args(["--strict", "--budget", "0.25", "--backend", "dispatch", "--", "python", "x.py"])
    given = {name: getattr(args, name) for name, _, _ in cli_options()}
    assert given == {"out": None, "base_model": None, "base_model_flops": None, "strict": True,
                     "backend": "dispatch", "budget": 0.25, "budget_warn_at": 0.8}
    defaults = parser.parse_args([])
    assert defaults.backend == MeterConfig().backend and defaults.budget_warn_at == MeterConfig().budget_warn_at


def _step(layer, opt, x) -> None:
    layer(x).sum().backward()
    opt.step()
    opt.zero_grad()


def _loop():
    torch.manual_seed(0)
    layer = torch.nn.Linear(K, N, bias=False)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1), torch.randn(M, K)


def _per_step() -> int:
    layer, opt, x = _loop()
    with flopcount.meter(backend="dispatch") as m:
        _step(layer, opt, x)
        m.step()
    return m.training_flops


def test_budget_action_stop_sets_should_stop_and_raises_nothing():
    per_step = _per_step()
    # forward product + weight-gradient product + the SGD update and the sum (vector work)
    assert per_step > 2 * MM
    layer, opt, x = _loop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(backend="dispatch", budget=2 * per_step + per_step // 2, budget_action="stop") as m:
            steps = 0
            while not m.should_stop:
                _step(layer, opt, x)
                m.step()
                steps += 1
                assert steps < 10
    # Two steps fit; a third would reach 3 x per_step >= the budget: stop after the second.
    assert steps == 2 and m.training_flops == 2 * per_step
    assert m.job_training_flops() == 2 * per_step


def test_budget_action_raise_is_the_default():
    per_step = _per_step()
    layer, opt, x = _loop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BudgetExceeded):
            with flopcount.meter(backend="dispatch", budget=2 * per_step + per_step // 2) as m:
                for _ in range(10):
                    _step(layer, opt, x)
                    m.step()
    assert m.training_flops == 2 * per_step and not m.should_stop


def test_the_callbacks_check_their_options_with_the_config():
    pytest.importorskip("transformers")
    from flopcount.integrations.hf import FlopMeterCallback

    callback = FlopMeterCallback(backend="dispatch", budget=0.5)
    assert callback.config == MeterConfig(backend="dispatch", budget=0.5, auto_steps=False, budget_action="stop")
    with pytest.raises(ValueError, match="flush_every=0 must be a positive integer"):
        FlopMeterCallback(flush_every=0)
