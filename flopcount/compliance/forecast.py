"""Forecast: a run's total training compute from a few measured steps and the plan.

The guidelines ask a modifier to foresee whether a modification will cross its threshold before
training. From measured steps, FLOPs per step (or per token, when tokens were recorded) times the
planned steps (or tokens) projects the total, and the threshold is crossed at
ceil(threshold / FLOPs per step) steps.
"""
from __future__ import annotations

import math
from fractions import Fraction

from ..errors import BadInput
from ..report.format import flop_text
from .thresholds import DEFAULT_APPROACHING, status_of


def forecast(measured_flops: int, measured_steps: int, *, threshold_flops: Fraction,
             measured_tokens: int | None = None, planned_steps: int | None = None,
             planned_tokens: int | None = None, seconds_per_step: float | None = None,
             approaching: float = DEFAULT_APPROACHING) -> dict:
    """Projected total and crossing point. Exactly one of ``planned_steps``/``planned_tokens``."""
    if (planned_steps is None) == (planned_tokens is None):
        raise BadInput("flopcount: give exactly one of the planned steps or the planned tokens")
    if measured_steps < 1 or measured_flops <= 0:
        raise BadInput("flopcount: the trace has no measured training FLOPs to project from")
    per_step = Fraction(int(measured_flops), int(measured_steps))
    if planned_tokens is not None:
        if not measured_tokens:
            raise BadInput("flopcount: the trace has no token counts (pass tokens= to Meter.step()); "
                             "plan in steps instead")
        per_token = Fraction(int(measured_flops), int(measured_tokens))
        projected = per_token * planned_tokens
        tokens_per_step = Fraction(int(measured_tokens), int(measured_steps))
        planned_steps_equiv = Fraction(planned_tokens) / tokens_per_step
    else:
        per_token = Fraction(int(measured_flops), int(measured_tokens)) if measured_tokens else None
        projected = per_step * planned_steps
        planned_steps_equiv = Fraction(planned_steps)
    crosses = projected >= threshold_flops
    crossing_step = math.ceil(threshold_flops / per_step)
    result = {
        "measured_steps": int(measured_steps),
        "measured_training_flops": int(measured_flops),
        "measured_tokens": measured_tokens,
        "flops_per_step": float(per_step),
        "flops_per_token": float(per_token) if per_token is not None else None,
        "planned_steps": planned_steps,
        "planned_tokens": planned_tokens,
        "projected_training_flops": float(projected),
        "threshold_flops": float(threshold_flops),
        "projected_ratio": float(projected / threshold_flops),
        "projected_status": status_of(projected, threshold_flops, approaching),
        "crosses_threshold": bool(crosses),
        "crossing_step": crossing_step,
        "crossing_tokens": float(threshold_flops / per_token) if per_token is not None else None,
        "crossing_fraction_of_plan": float(crossing_step / planned_steps_equiv),
        "crossing_after_s": crossing_step * seconds_per_step if seconds_per_step else None,
        "projected_duration_s": float(planned_steps_equiv * Fraction(seconds_per_step)) if seconds_per_step else None,
        "text": {"projected_training_flops": flop_text(float(projected)),
                 "threshold_flops": flop_text(float(threshold_flops)),
                 "flops_per_step": flop_text(float(per_step))},
    }
    return result
