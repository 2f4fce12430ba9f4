"""PyTorch Lightning callback: the Trainer callback's behaviour (hf.py) for ``lightning.Trainer``.

    from flopcount.integrations.lightning import FlopMeterCallback
    trainer = lightning.Trainer(..., callbacks=[FlopMeterCallback(out="runs/ft-1", base_model="Qwen/Qwen2.5-0.5B")])

One flopcount step per optimizer step (``trainer.global_step`` advancing; gradient accumulation
keeps micro-batches in one step): ``steps`` equals ``global_step``. Validation, test and predict
loops are phase ``eval`` (Meter.evaluating); other no-grad work inside training steps (a teacher
or reference forward in ``training_step``) is training work (docs/conventions.md). Tokens: the sum
of a dict batch's ``attention_mask`` (else its ``input_ids``' size); samples: the batch size.
``flopcount/training_flops`` and ``flopcount/threshold_ratio`` go to the Trainer's loggers. With
``budget``, the callback saves a checkpoint (``budget_checkpoint``, default
``<default_root_dir>/flopcount-budget-stop.ckpt``) and sets ``trainer.should_stop`` when the
next step would reach the budget.
"""
from __future__ import annotations

import os
import sys
from fractions import Fraction

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from ..meter import Meter
from .hf import LOG_PREFIX, batch_tokens, callback_config, registry_name, start_metering, step_and_measure


def lightning_batch_tokens(batch) -> tuple[int | None, int | None]:
    """(tokens, samples) of a Lightning batch: a dict like a Hugging Face batch, or a tuple/list
    or tensor whose first tensor's first dimension is the batch size (no tokens then)."""
    import torch

    if isinstance(batch, dict):
        return batch_tokens((), batch)
    first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        return None, int(first.shape[0])
    return None, None


class FlopMeterCallback(Callback):
    """Meters a Lightning Trainer's fit with flopcount. Options as in the Hugging Face callback."""

    def __init__(self, out=None, *, budget_checkpoint: str | None = None, **options) -> None:
        self.config = callback_config(out, **options)  # bad options are errors now, not at the first step
        self.budget_checkpoint = budget_checkpoint
        self.meter: Meter | None = None
        self.threshold: Fraction | None = None
        self.training_flops = 0
        self.stopped_by_budget = False
        self._tokens: int | None = None
        self._samples: int | None = None
        self._global_step = 0
        self._evaluation = None  # the open Meter.evaluating() of a validation / test / predict loop

    def on_fit_start(self, trainer, pl_module) -> None:
        base_model = self.config.base_model
        if base_model is None and self.config.base_model_flops is None:
            base_model = registry_name(pl_module) or registry_name(getattr(pl_module, "model", None))
        start_metering(self, base_model)
        self._global_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        tokens, samples = lightning_batch_tokens(batch)
        if tokens is not None:
            self._tokens = (self._tokens or 0) + tokens
        if samples is not None:
            self._samples = (self._samples or 0) + samples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.meter is None or trainer.global_step == self._global_step:
            return  # gradient accumulation: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        stop = step_and_measure(self, self._tokens, self._samples)
        self._tokens = self._samples = None
        self._log(trainer)
        if stop:
            path = self.budget_checkpoint or os.path.join(trainer.default_root_dir, "flopcount-budget-stop.ckpt")
            trainer.save_checkpoint(path)
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"{self.meter.budget.stop_message(trainer.global_step)}; checkpoint {path}", file=sys.stderr)

    def _log(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {f"{LOG_PREFIX}training_flops": float(self.training_flops),
                   f"{LOG_PREFIX}threshold_ratio": float(Fraction(self.training_flops) / self.threshold)}
        for logger in trainer.loggers:  # straight to the loggers: no tensor ops inside the meter
            logger.log_metrics(metrics, step=trainer.global_step)

    # ---- Lightning's evaluation loops: phase eval ---------------------------------------------
    def _evaluating(self) -> None:
        if self.meter is not None and self.meter._active and self._evaluation is None:
            self._evaluation = self.meter.evaluating()
            self._evaluation.__enter__()

    def _evaluated(self) -> None:
        if self._evaluation is not None:
            evaluation, self._evaluation = self._evaluation, None
            evaluation.__exit__(None, None, None)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._evaluating()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._evaluated()

    def on_test_start(self, trainer, pl_module) -> None:
        self._evaluating()

    def on_test_end(self, trainer, pl_module) -> None:
        self._evaluated()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._evaluating()

    def on_predict_end(self, trainer, pl_module) -> None:
        self._evaluated()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def summary(self) -> dict | None:
        """The meter's summary (this rank), also after fit ended."""
        return self.meter.summary() if self.meter is not None else None

    def _close(self) -> None:
        self._evaluated()
        if self.meter is not None and self.meter._active:
            self.meter.__exit__(None, None, None)
