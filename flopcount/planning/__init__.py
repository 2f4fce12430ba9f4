"""Plan before you train: the FLOPs of a planned fine-tune, counted from one real training step.

``plan(...)`` builds the model from its Hugging Face config.json on the meta device (nothing is
allocated), runs one real optimizer step of it (forward, loss, backward over ``grad_accum``
micro-batches, optimizer step) under the meter, and books it through the same formulas and
phases as a metered run: for the same config, the planned step equals the metered step exactly.
The totals, the threshold check, the largest plan below it and the crossing date follow from
that step with the compliance module's own arithmetic (thresholds.py, forecast.py).
"""
from __future__ import annotations

import datetime as dt
import math
from fractions import Fraction

from ..compliance.forecast import forecast
from ..compliance.notification import NOTIFICATION_RULE, notify_by
from ..compliance.thresholds import DEFAULT_APPROACHING, assess, check_approaching, resolve_base, threshold
from ..errors import BadInput
from .configs import load_config
from .lengths import read_lengths

__all__ = ["plan"]


def plan(config, *, seq_len: int | None = None, batch_size: int = 1, steps: int | None = None,
         tokens: int | None = None, grad_accum: int = 1, lora_rank: int | None = None,
         lora_targets=("q_proj", "v_proj"), qlora: bool = False, gradient_checkpointing: bool = False,
         optimizer: str = "adamw", attn: str = "sdpa", dtype: str = "bfloat16", base_model: str | None = None,
         base_model_flops: float | None = None, systemic_risk: bool | None = None,
         tokens_per_second: float | None = None, seconds_per_step: float | None = None, start=None,
         lengths=None, approaching: float | None = None) -> dict:
    """Plan a fine-tune. ``config``: a config.json path, a dict of its values, or a registry name
    whose architecture config ships with flopcount. Exactly one of ``steps``/``tokens``.
    ``lengths``: a length histogram (path or {length: count}) instead of ``seq_len``.
    ``qlora``: LoRA on a 4-bit base (planned as frozen Linear GEMMs; needs ``lora_rank``).
    Returns the plan as a JSON-serialisable dict (keys: docs in README "Plan before you train")."""
    options = _check(seq_len=seq_len, batch_size=batch_size, steps=steps, tokens=tokens, grad_accum=grad_accum,
                     lora_rank=lora_rank, qlora=qlora, optimizer=optimizer, attn=attn, dtype=dtype,
                     tokens_per_second=tokens_per_second, seconds_per_step=seconds_per_step, lengths=lengths)
    approaching = check_approaching(approaching if approaching is not None else DEFAULT_APPROACHING)
    start_time = _start(start)
    values, config_name, registry_name = load_config(config)
    base = resolve_base(base_model or (registry_name if base_model_flops is None else None),
                        base_model_flops, systemic_risk)
    buckets = read_lengths(lengths) if lengths is not None else {int(seq_len): 1}
    targets = tuple(lora_targets.split(",")) if isinstance(lora_targets, str) else tuple(lora_targets)

    from . import model as planned_model
    from .step import metered_step

    net = planned_model.build(values, attn=attn, dtype=dtype, lora_rank=lora_rank, lora_targets=targets,
                              gradient_checkpointing=gradient_checkpointing)
    opt = planned_model.optimizer(net, optimizer)
    n_params, n_trainable = planned_model.parameter_counts(net)
    per_length = {length: metered_step(net, opt, batch_size=batch_size, seq_len=length, grad_accum=grad_accum)
                  for length in sorted(buckets)}
    weight_sum = sum(buckets.values())
    # Exact per-step figures: the frequency-weighted sum over buckets / the sum of the weights.
    weighted_training = sum(buckets[n] * s["training_flops"] for n, s in per_length.items())
    weighted_tokens = sum(buckets[n] * s["tokens"] for n, s in per_length.items())
    flops_per_step = Fraction(weighted_training, weight_sum)
    tokens_per_step = Fraction(weighted_tokens, weight_sum)
    hardware_per_step = Fraction(sum(buckets[n] * s["hardware_flops"] for n, s in per_length.items()), weight_sum)
    planned_steps = steps if steps is not None else math.ceil(Fraction(tokens) / tokens_per_step)
    if seconds_per_step is None and tokens_per_second is not None:
        seconds_per_step = float(tokens_per_step / Fraction(repr(float(tokens_per_second))))

    limit, _ = threshold(base["base_model_flops"], base["systemic_risk"])
    projection = forecast(weighted_training, weight_sum, threshold_flops=limit, measured_tokens=weighted_tokens,
                          planned_steps=planned_steps, seconds_per_step=seconds_per_step, approaching=approaching)
    near = forecast(weighted_training, weight_sum, threshold_flops=limit * Fraction(repr(approaching)),
                    measured_tokens=weighted_tokens, planned_steps=planned_steps,
                    seconds_per_step=seconds_per_step, approaching=approaching)
    training_total = _round(flops_per_step * planned_steps)
    tokens_total = _round(tokens_per_step * planned_steps)
    check = assess(training_total, base, approaching)
    result = {
        "config": config_name,
        "model_type": values.get("model_type"),
        "setup": {"seq_len": seq_len if lengths is None else None, "lengths": {str(k): v for k, v in sorted(buckets.items())}
                  if lengths is not None else None, "batch_size": batch_size, "grad_accum": grad_accum,
                  "lora_rank": lora_rank, "lora_targets": list(targets) if lora_rank else None, "qlora": bool(qlora),
                  "gradient_checkpointing": bool(gradient_checkpointing), "optimizer": optimizer, "attn": attn,
                  "dtype": dtype, "requested_steps": steps, "requested_tokens": tokens},
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "per_step": per_length[next(iter(per_length))] if len(per_length) == 1 else _weighted(per_length, buckets),
        "per_length": ({str(n): {"weight": buckets[n], "training_flops": s["training_flops"],
                                 "hardware_flops": s["hardware_flops"], "tokens": s["tokens"]}
                        for n, s in per_length.items()} if lengths is not None else None),
        "flops_per_step": float(flops_per_step),
        "tokens_per_step": float(tokens_per_step),
        "steps": planned_steps,
        "tokens": tokens_total,
        "training_flops": training_total,
        "hardware_flops": _round(hardware_per_step * planned_steps),
        **{k: check[k] for k in ("threshold_flops", "threshold_basis", "threshold_basis_text", "status", "ratio",
                                 "base_model", "base_model_flops", "base_model_flops_source", "base_model_method",
                                 "systemic_risk", "approaching_fraction", "combined_flops", "combined_status")},
        "max_steps_below_threshold": projection["crossing_step"] - 1,
        "max_tokens_below_threshold": _floor(tokens_per_step * (projection["crossing_step"] - 1)),
        "max_steps_below_approaching": near["crossing_step"] - 1,
        "max_tokens_below_approaching": _floor(tokens_per_step * (near["crossing_step"] - 1)),
        "formulas": _formulas(n_params, n_trainable, tokens_total, training_total),
        "seconds_per_step": seconds_per_step,
        "crossing": _crossing(projection, start_time, seconds_per_step, planned_steps),
        "text": {"training_flops": check["text"]["training_flops"], "threshold_flops": check["text"]["threshold_flops"]},
    }
    result["setup"]["qlora_note"] = ("4-bit base weights planned as frozen Linear GEMMs (same FLOPs; "
                                     "dequantization not planned)") if qlora else None
    return result


def _check(*, seq_len, batch_size, steps, tokens, grad_accum, lora_rank, qlora, optimizer, attn, dtype,
           tokens_per_second, seconds_per_step, lengths) -> dict:
    from .model import ATTENTION, DTYPES, OPTIMIZERS

    if (steps is None) == (tokens is None):
        raise BadInput("flopcount: give exactly one of --steps N or --tokens T")
    if (seq_len is None) == (lengths is None):
        raise BadInput("flopcount: give exactly one of --seq-len S or --lengths FILE")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("steps", steps), ("tokens", tokens),
                        ("grad_accum", grad_accum), ("lora_rank", lora_rank)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadInput(f"flopcount: {name}={value!r} must be a whole number of at least 1")
    if qlora and not lora_rank:
        raise BadInput("flopcount: --qlora trains LoRA adapters on a 4-bit base: give --lora-rank R")
    if optimizer not in OPTIMIZERS:
        raise BadInput(f"flopcount: optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if attn not in ATTENTION:
        raise BadInput(f"flopcount: attn {attn!r} is not one of {', '.join(ATTENTION)}")
    if dtype not in DTYPES:
        raise BadInput(f"flopcount: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if tokens_per_second is not None and seconds_per_step is not None:
        raise BadInput("flopcount: give at most one of --tokens-per-second and --seconds-per-step")
    for name, value in (("tokens_per_second", tokens_per_second), ("seconds_per_step", seconds_per_step)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise BadInput(f"flopcount: {name}={value!r} must be a positive number")
    return {}


def _start(start) -> float | None:
    if start is None:
        return None
    if isinstance(start, dt.datetime):
        moment = start
    else:
        try:
            moment = dt.datetime.fromisoformat(str(start))
        except ValueError:
            raise BadInput(f"flopcount: start date {start!r} is not an ISO date (2026-01-15 or "
                             "2026-01-15T08:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def _round(value: Fraction) -> int:
    return int(round(value))


def _floor(value: Fraction) -> int:
    return math.floor(value)


def _formulas(n_params: int, n_trainable: int, tokens: int, counted: int) -> dict:
    """6·N·D and the LoRA-aware (4·N + 2·N_trainable)·D beside the count, with the deviation
    (formula / counted - 1)."""
    six = 6 * n_params * tokens
    aws = (4 * n_params + 2 * n_trainable) * tokens
    return {"6ND": {"flops": six, "deviation": six / counted - 1 if counted else None,
                    "formula": "6 x parameters x tokens"},
            "aws": {"flops": aws, "deviation": aws / counted - 1 if counted else None,
                    "formula": "(4 x parameters + 2 x trainable parameters) x tokens"}}


def _crossing(projection: dict, start_time: float | None, seconds_per_step: float | None, steps: int) -> dict:
    """When the threshold would be crossed and the Art. 52(1) notification deadline (two weeks)."""
    step = projection["crossing_step"]
    crosses = step <= steps
    out = {"crosses": crosses, "step": step if crosses else None, "after_s": None, "date": None,
           "notify_by": None, "rule": NOTIFICATION_RULE}
    if crosses and seconds_per_step:
        out["after_s"] = step * seconds_per_step
        if start_time is not None:
            day = dt.datetime.fromtimestamp(start_time + out["after_s"], dt.timezone.utc)
            out["date"] = day.isoformat(timespec="seconds")
            out["notify_by"] = notify_by(day)
    return out


def _weighted(per_length: dict, weights: dict):
    """The frequency-weighted mean of the per-length summaries: numbers are averaged (exactly, then
    rounded to whole FLOP), everything else is taken from the first length."""
    total = sum(weights.values())
    items = list(per_length.items())

    def merge(values):
        first = values[0][1]
        if isinstance(first, bool) or first is None or isinstance(first, str):
            return first
        if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for _, v in values):
            mean = sum(Fraction(weights[n]) * Fraction(v) for n, v in values) / total
            return _round(mean) if all(isinstance(v, int) for _, v in values) else float(mean)
        if isinstance(first, dict):
            keys = list(dict.fromkeys(k for _, v in values if isinstance(v, dict) for k in v))
            return {k: merge([(n, v.get(k, 0) if isinstance(v, dict) else 0) for n, v in values]) for k in keys}
        return first

    return merge([(n, s) for n, s in items])
