"""Budget guard: warn when a run's training compute nears a budget, stop it before it crosses.

A budget is a fraction of the run's EU AI Act threshold (a number in (0, 1]) or an absolute
number of FLOP (a number above 1). After every step (at ``Meter.step()``, or right after
``optimizer.step()`` when steps close automatically) the guard takes the job's training FLOPs so
far (all ranks: one all-reduce under torch.distributed) and forecasts the next step as the
largest step seen so far. When ``total + forecast`` would reach the budget, training must stop
*now*: the step that would cross never runs. Plain loops get ``BudgetExceeded`` (after the traces
are flushed); the Trainer and Lightning callbacks save a checkpoint and stop the loop instead.

The forecast is exact for steps of equal work (fixed batch shapes). A step larger than every step
before it (a longer padded batch) can still overshoot by the difference: keep a margin then.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from fractions import Fraction

from .accounting import StepAccumulator
from .compliance.thresholds import DEFAULT_APPROACHING, exact, resolve_base, threshold
from .errors import BadInput, BudgetExceeded  # noqa: F401  (BudgetExceeded: also imported from here)
from .report.format import flop_text, percent

OK, WARN, STOP = "ok", "warn", "stop"
DEFAULT_WARN_AT = DEFAULT_APPROACHING  # warn when approaching the budget


class BudgetWarning(UserWarning):
    """Training compute has reached the warning fraction of the budget."""


def budget_limit(budget, threshold_flops: Fraction) -> Fraction:
    """The budget in FLOP: a fraction in (0, 1] of ``threshold_flops``, or FLOP when above 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, Fraction)) \
            or not math.isfinite(budget) or budget <= 0:
        raise BadInput(f"flopcount: budget={budget!r} must be a fraction of the threshold in (0, 1] "
                         f"or a number of FLOP above 1 (e.g. 0.5 or 1e21)")
    return exact(budget) * threshold_flops if budget <= 1 else exact(budget)


def check_warn_at(warn_at) -> float:
    if isinstance(warn_at, bool) or not isinstance(warn_at, (int, float)) or not 0 < warn_at <= 1:
        raise BadInput(f"flopcount: budget_warn_at={warn_at!r} must be a fraction of the budget in (0, 1]")
    return float(warn_at)


def decide(total: int, forecast: int, limit: Fraction, warn_at: float, warned: bool) -> str:
    """STOP when the next step would bring ``total`` to or over ``limit`` (reaching a threshold is
    already exceeding it), WARN once ``total`` reaches ``warn_at`` of it, else OK."""
    if total + forecast >= limit:
        return STOP
    if not warned and total >= exact(warn_at) * limit:
        return WARN
    return OK


def run_threshold(base_model: str | None, base_model_flops: float | None) -> tuple[Fraction, str]:
    """(threshold FLOP, basis) for the meter's base model; a name not in the registry gets the
    cautious unknown-compute threshold, as in Meter.summary()."""
    try:
        base = resolve_base(base_model, base_model_flops)
    except ValueError:
        base = resolve_base(None, None)
    return threshold(base["base_model_flops"], base["systemic_risk"])


@dataclass
class BudgetGuard:
    """Tracks one run against its budget. ``observe(total)`` after each closed step."""

    limit: Fraction
    warn_at: float = DEFAULT_WARN_AT
    what: str = ""              # the budget in words, for messages
    last_total: int = 0
    largest_step: int = 0
    warned: bool = False
    stopped: bool = False

    @classmethod
    def create(cls, budget, warn_at=DEFAULT_WARN_AT, *, base_model=None, base_model_flops=None) -> "BudgetGuard":
        warn_at = check_warn_at(warn_at)
        if isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1:
            limit_of, _ = run_threshold(base_model, base_model_flops)
            limit = budget_limit(budget, limit_of)
            what = f"{flop_text(limit)} ({percent(float(budget))} of the threshold {flop_text(limit_of)})"
        else:
            limit = budget_limit(budget, Fraction(0))
            what = flop_text(limit)
        return cls(limit=limit, warn_at=warn_at, what=what)

    @property
    def forecast(self) -> int:
        return self.largest_step

    def observe(self, total: int) -> str:
        """The action after a step that brought the job's training FLOPs to ``total``."""
        self.largest_step = max(self.largest_step, total - self.last_total)
        self.last_total = total
        action = decide(total, self.largest_step, self.limit, self.warn_at, self.warned)
        self.warned |= action != OK
        self.stopped |= action == STOP
        return action

    def check(self, meter, pending: int = 0) -> str:
        """Observe ``meter``'s job-wide training FLOPs (closed steps, plus ``pending`` FLOPs of the
        open step) and warn when due. Under torch.distributed every rank must call it at the same
        point (one all-reduce), so that all ranks take the same decision."""
        action = self.observe(job_training_flops(meter, pending))
        if action == WARN and meter.rank == 0:
            warnings.warn(f"flopcount: training compute {flop_text(self.last_total)} has reached "
                          f"{percent(float(Fraction(self.last_total) / self.limit))} of the budget {self.what}",
                          BudgetWarning, stacklevel=4)
        return action

    def stop_message(self, step: int) -> str:
        return (f"flopcount: budget guard stopped training after step {step}: {flop_text(self.last_total)} so far "
                f"+ {flop_text(self.forecast)} forecast for the next step would reach the budget {self.what}")

    def exceeded(self, step: int) -> BudgetExceeded:
        return BudgetExceeded(self.stop_message(step), total=self.last_total, forecast=self.forecast,
                              limit=float(self.limit), step=step)


def job_training_flops(meter, pending: int = 0) -> int:
    """Training FLOPs of the meter's closed steps plus ``pending``, summed over all ranks when
    distributed (one all-reduce, booked nowhere: it is the meter's communication, not the job's)."""
    import torch.distributed as dist

    local = int(meter.training_flops) + int(pending)
    if not (meter.world_size > 1 and dist.is_available() and dist.is_initialized()):
        return local
    from .distributed import all_reduce_totals, local_totals

    totals = {**local_totals(meter.rollup), "training_flops": local}
    with meter.counter.redirect(StepAccumulator()):
        return int(all_reduce_totals(totals)["training_flops"])
