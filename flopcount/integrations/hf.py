"""Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, a Trainer) callback.

    from flopcount.integrations.hf import FlopMeterCallback
    trainer = Trainer(..., callbacks=[FlopMeterCallback(out="runs/ft-1", base_model="meta-llama/Llama-3.1-8B")])

- One flopcount step per optimizer step (``on_step_end``): ``steps`` equals ``global_step``; the
  work after the last step (a final evaluation, the loss bookkeeping) is trailing work.
  ``Trainer.evaluate`` / ``predict`` are booked in the ``eval`` phase, outside ``training_flops``;
  TRL's rollouts, reference, teacher and reward work in ``generation``, ``reference``,
  ``teacher`` and ``reward``, inside it (integrations/tags.py).
- Tokens are the real (non-padding) tokens: the sum of each training batch's ``attention_mask``
  (``input_ids.numel()`` when a batch has no mask, e.g. packed or padding-free batches).
- ``flopcount/training_flops`` (all ranks) and ``flopcount/threshold_ratio`` are added to the
  Trainer's logs, so TensorBoard / MLflow / W&B / the console show them.
- Without ``base_model``, the model's ``config._name_or_path`` is used when it is in the registry.
- ``budget`` (a fraction of the threshold or FLOP): warns at ``budget_warn_at`` of it; when the
  next step would reach it, the Meter says so (``budget_action="stop"``: ``Meter.should_stop``)
  and the callback saves a checkpoint and stops training (``should_training_stop``).
- The options are MeterConfig's (config.py), checked when the callback is made.
"""
from __future__ import annotations

import atexit
import sys
from fractions import Fraction

from transformers import TrainerCallback

from ..budget import run_threshold
from ..config import MeterConfig
from ..meter import Meter
from .tags import install as install_tags

LOG_PREFIX = "flopcount/"


def registry_name(model) -> str | None:
    """The registry id of the model's ``config._name_or_path`` (also for a local copy's path
    ending in ORG/NAME or NAME), else None. peft models forward ``config`` to their base model."""
    from ..compliance.registry import UnknownBaseModel, lookup

    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "").rstrip("/")
    parts = name.split("/")
    for candidate in dict.fromkeys(["/".join(parts[-2:]), parts[-1]] if name else []):
        try:
            return lookup(candidate).hf_id
        except UnknownBaseModel:
            continue
    return None


def batch_tokens(args, kwargs) -> tuple[int | None, int | None]:
    """(real tokens, samples) of one forward call's batch: the attention mask's sum, else the
    number of input ids. Read on the host with numpy, so that counting adds no metered FLOPs."""
    import torch

    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.detach().cpu().numpy().astype(bool).sum()), int(mask.shape[0])
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.numel()), int(ids.shape[0])
    return None, None


class TokenCounter:
    """Counts the tokens of the model's training forwards (grad enabled, ``model.training``)."""

    def __init__(self) -> None:
        self.tokens: int | None = None
        self.samples: int | None = None
        self.handle = None

    def attach(self, model) -> None:
        self.handle = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _pre_forward(self, module, args, kwargs):
        import torch

        if not (module.training and torch.is_grad_enabled()):
            return None
        tokens, samples = batch_tokens(args, kwargs)
        if tokens is not None:
            self.tokens = (self.tokens or 0) + tokens
            self.samples = (self.samples or 0) + samples
        return None

    def take(self) -> tuple[int | None, int | None]:
        taken = self.tokens, self.samples
        self.tokens = self.samples = None
        return taken


def move_to_front(callback, depth: int = 4) -> bool:
    """Put ``callback`` first in the calling CallbackHandler's list, so that the values it adds in
    ``on_log`` reach the reporting callbacks (Trainer puts user callbacks after them)."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        callbacks = getattr(frame.f_locals.get("self"), "callbacks", None)
        if isinstance(callbacks, list) and callback in callbacks:
            callbacks.remove(callback)
            callbacks.insert(0, callback)
            return True
        frame = frame.f_back
    return False


def callback_config(out, **options) -> MeterConfig:
    """The meter options of a framework callback (Trainer, Lightning), checked now: steps are
    closed by the callback, never by optimizer hooks, and the budget guard stops training through
    the callback (``budget_action="stop"``) instead of raising into the trainer."""
    return MeterConfig(out=out, auto_steps=False, budget_action="stop", **options)


def start_metering(callback, base_model: str | None) -> None:
    """Threshold and an entered Meter for a framework callback, with ``base_model`` as resolved
    from the model when the callback was given none."""
    config = callback.config.replace(base_model=base_model)
    callback.threshold, _ = run_threshold(config.base_model, config.base_model_flops)
    callback.meter = Meter(config=config)
    callback.meter.__enter__()


def step_and_measure(callback, tokens, samples) -> bool:
    """Close one trainer step; keep the job's training FLOPs for the logs. True when the Meter's
    budget guard asks to stop (the same decision on every rank)."""
    callback.meter.step(tokens=tokens, samples=samples)
    callback.training_flops = callback.meter.job_training_flops()
    if callback.meter.should_stop:
        callback.stopped_by_budget = True
    return callback.meter.should_stop


class FlopMeterCallback(TrainerCallback):
    """Meters a Trainer's training with flopcount (see the module docstring).

    ``out``: trace dir (None: in memory only). ``base_model`` / ``base_model_flops``: the threshold's
    basis. ``budget``: a fraction of the threshold in (0, 1] or FLOP above 1; ``budget_warn_at``:
    the share of the budget that warns. Other keyword arguments: ``flopcount.meter``'s (MeterConfig)."""

    def __init__(self, out=None, **options) -> None:
        self.config = callback_config(out, **options)  # bad options are errors now, not at the first step
        self.meter: Meter | None = None
        self.tokens = TokenCounter()
        self.training_flops = 0  # job-wide (all ranks), after the latest step
        self.threshold: Fraction | None = None
        self.stopped_by_budget = False
        install_tags()  # TRL's generation / reference / teacher / reward work and Trainer.evaluate tagged

    # ---- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        move_to_front(self)
        self.start_early(model)
        if model is not None and self.tokens.handle is None:
            self.tokens.attach(model)

    def start_early(self, model) -> None:
        """Open the meter (once): at ``on_train_begin``, or earlier for work that feeds training
        but runs before it (DPO's ``precompute_ref_log_probs`` pass in the trainer's ``__init__``)."""
        if self.meter is not None:
            return
        base_model = self.config.base_model
        if base_model is None and self.config.base_model_flops is None:
            base_model = registry_name(model)
        start_metering(self, base_model)
        atexit.register(self._close)  # an exception ends train() without on_train_end

    def on_step_end(self, args, state, control, **kwargs):
        if self.meter is None:
            return
        tokens, samples = self.tokens.take()
        if step_and_measure(self, tokens, samples):
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(self.meter.budget.stop_message(state.global_step), file=sys.stderr)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.meter is None or logs is None:
            return
        values = {f"{LOG_PREFIX}training_flops": float(self.training_flops),
                  f"{LOG_PREFIX}threshold_ratio": float(Fraction(self.training_flops) / self.threshold)}
        logs.update(values)
        if state.log_history:  # the Trainer stored a copy of logs before calling us
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        atexit.unregister(self._close)

    # ---- results --------------------------------------------------------------------------
    def summary(self) -> dict | None:
        """The meter's summary (this rank), also after training ended."""
        return self.meter.summary() if self.meter is not None else None

    def _close(self) -> None:
        self.tokens.detach()
        if self.meter is not None and self.meter._active:
            self.meter.__exit__(None, None, None)

