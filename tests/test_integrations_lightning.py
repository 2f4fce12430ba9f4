"""The Lightning callback with a real lightning.Trainer on CPU.

Model: Linear 16 -> 32 (no bias), ReLU, Linear 32 -> 4 (no bias). Per sample a forward's matmul
is 2 x (16*32 + 32*4) FLOPs; backward computes both weight gradients (the same again) and the
input gradient of the second Linear only (2 x 32*4): the data needs no gradient.
"""
from __future__ import annotations

import csv
import os

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from flopcount.integrations.lightning import FlopMeterCallback  # noqa: E402
from flopcount.trace.reader import read_table  # noqa: E402

D_IN, D_HID, D_OUT = 16, 32, 4
FORWARD_PER_SAMPLE = 2 * (D_IN * D_HID + D_HID * D_OUT)
BACKWARD_PER_SAMPLE = FORWARD_PER_SAMPLE + 2 * D_HID * D_OUT


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID, bias=False), torch.nn.ReLU(),
                                       torch.nn.Linear(D_HID, D_OUT, bias=False))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int, batch: int = 8):
    g = torch.Generator().manual_seed(n)
    data = torch.utils.data.TensorDataset(torch.randn(n, D_IN, generator=g), torch.randn(n, D_OUT, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def make_trainer(tmp_path, callback, **options):
    defaults = dict(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, num_sanity_val_steps=0,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=str(tmp_path), logger=pl.loggers.CSVLogger(str(tmp_path), name="logs"),
                    callbacks=[callback])
    defaults.update(options)
    return pl.Trainer(**defaults)


def test_lightning_callback_steps_eval_and_logs(tmp_path):
    torch.manual_seed(0)
    callback = FlopMeterCallback(out=str(tmp_path / "trace"), backend="dispatch")
    trainer = make_trainer(tmp_path, callback)
    # 32 samples in batches of 8, two batches per optimizer step: 2 steps, one epoch, then one
    # validation pass over 8 samples.
    trainer.fit(Regressor(), loader(32), loader(8))
    summary = callback.summary()
    cats = summary["by_phase_category"]
    assert cats["forward"]["matmul"] == 32 * FORWARD_PER_SAMPLE
    assert cats["backward"]["matmul"] == 32 * BACKWARD_PER_SAMPLE
    assert cats["eval"]["matmul"] == 8 * FORWARD_PER_SAMPLE
    assert "matmul" not in cats.get("optimizer", {})  # the closure's forward/backward keep their phases
    assert summary["samples"] == 32
    assert summary["tokens"] is None  # tensor batches carry no tokens
    steps = read_table(str(tmp_path / "trace"), "steps").to_pandas()
    assert (steps["training_flops"] > 0).sum() == 2  # one step per optimizer step (validation: no training work)
    # steps == global_step (accumulate_grad_batches=2); the validation after the last step is
    # trailing work, counted in phase eval.
    assert summary["steps"] == trainer.global_step == 2
    assert steps.sort_values("step")["trailing"].tolist() == [False, False, True]
    assert summary["trailing_flops"] == summary["by_phase"]["eval"]
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        logged = [float(row["flopcount/training_flops"]) for row in csv.DictReader(f)
                  if row.get("flopcount/training_flops")]
    assert logged[-1] == summary["training_flops"] and len(logged) == 2


def test_lightning_budget_checkpoints_and_stops_before_crossing(tmp_path):
    torch.manual_seed(0)
    # SGD steps of equal shapes do equal work; 1.5 steps' worth allows exactly one step.
    probe = FlopMeterCallback(backend="dispatch")
    make_trainer(tmp_path / "probe", probe, max_steps=1, logger=False).fit(Regressor(), loader(16))
    per_step = probe.summary()["training_flops"]
    callback = FlopMeterCallback(backend="dispatch", budget=int(1.5 * per_step))
    trainer = make_trainer(tmp_path, callback, max_steps=5, logger=False)
    trainer.fit(Regressor(), loader(80))
    total = callback.summary()["training_flops"]
    assert callback.stopped_by_budget and trainer.global_step == 1
    assert total < 1.5 * per_step <= total + per_step
    assert os.path.isfile(tmp_path / "flopcount-budget-stop.ckpt")
