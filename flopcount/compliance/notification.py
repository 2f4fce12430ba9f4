"""Art. 52(1) notification timing: when the threshold was (or will be) reached, and by when to notify.

When a modification's training compute reaches its threshold (or a forecast says it will),
Art. 52(1) AI Act gives two weeks from the day the requirement is met, or from the day it becomes
known that it will be met, to notify the Commission. The audit report, the Code of Practice form
(report/cop.py) and the planner (planning/) state that date and the end of the window from here;
it is information, not legal advice.
"""
from __future__ import annotations

import datetime as dt

from ..exact import exact_sums_at, running_sums
from ..report.format import iso_time
from .forecast import forecast
from .thresholds import DEFAULT_APPROACHING, exact, threshold

NOTIFICATION_DAYS = 14
NOTIFICATION_RULE = ("Art. 52(1) AI Act: notify the Commission without delay and in any event within two weeks "
                     "after the requirement is met or it becomes known that it will be met")


def notify_by(day: dt.datetime) -> str:
    """The last day to notify (ISO date) for a window that starts at ``day`` (UTC)."""
    return (day + dt.timedelta(days=NOTIFICATION_DAYS)).date().isoformat()


def crossing_time(rows, threshold) -> float | None:
    """When cumulative training FLOPs first reached ``threshold``: the end time of that step.

    ``rows``: (end_time, training FLOPs) of every step of every rank, in any order; summed
    exactly (flopcount/exact.py)."""
    limit = exact(threshold)
    ordered = sorted(rows, key=lambda r: r[0])
    for (end_time, _), total in zip(ordered, running_sums(flops for _, flops in ordered)):
        if total >= limit:
            return float(end_time)
    return None


def crossing_time_of_traces(traces, threshold) -> float | None:
    """``crossing_time`` over the steps tables of opened traces: per step of each rank, the end of
    its last row and the exact sum of its rows (several for a step over int64: step_rows.py)."""
    # pyarrow: only for traces, not for the planner and the form
    from ..trace.arrays import to_numpy
    from ..trace.reader import iter_batches
    from ..trace.step_rows import STEP_KEY, step_ends, step_starts

    rows = []
    for batch in iter_batches(traces, "steps", [*STEP_KEY, "end_time", "training_flops"]):
        starts = step_starts(batch)
        ends = to_numpy(batch.column("end_time"))[step_ends(starts, batch.num_rows)].tolist()
        rows.extend(zip(ends, exact_sums_at(batch.column("training_flops"), starts)))
    return crossing_time(rows, threshold)


def expected_crossing_time(projection: dict, last_time: float | None, seconds_per_step: float | None) -> float | None:
    """When a forecast (compliance.forecast) expects the threshold: after the measured steps, the
    remaining steps to the crossing at the measured pace. None when it does not cross."""
    if not projection.get("crosses_threshold") or last_time is None or not seconds_per_step:
        return None
    remaining = max(projection["crossing_step"] - projection["measured_steps"], 0)
    return last_time + remaining * seconds_per_step


def notification_timing(*, crossed_at: float | None = None, expected_at: float | None = None,
                        known_at: float | None = None, forecast_crosses: bool = False) -> dict:
    """The notification window: two weeks from the day the threshold was reached (``crossed_at``),
    or, for a forecast crossing (at ``expected_at`` when the pace is known; ``forecast_crosses``
    without a date), from the day it became known (``known_at``, the day of the forecast) or the
    expected day, whichever is earlier."""
    if crossed_at is not None:
        day = dt.datetime.fromtimestamp(crossed_at, dt.timezone.utc)
        return {"status": "reached", "date": day.date().isoformat(), "time": iso_time(crossed_at),
                "basis": "actual: the step at which the cumulative training compute reached the threshold",
                "window_starts": day.date().isoformat(), "notify_by": notify_by(day),
                "rule": NOTIFICATION_RULE,
                "text": f"threshold reached on {day.date().isoformat()}; notify by {notify_by(day)}"}
    if expected_at is not None or forecast_crosses:
        known = dt.datetime.fromtimestamp(known_at if known_at is not None else expected_at, dt.timezone.utc)
        expected = dt.datetime.fromtimestamp(expected_at, dt.timezone.utc) if expected_at is not None else None
        start = min(known, expected) if expected is not None else known
        when = expected.date().isoformat() if expected is not None else "an undated step (no step times to pace it)"
        return {"status": "expected", "date": expected.date().isoformat() if expected else None,
                "time": iso_time(expected_at),
                "basis": "forecast: measured training FLOPs per step and step time, extended to the plan",
                "known_since": known.date().isoformat(), "window_starts": start.date().isoformat(),
                "notify_by": notify_by(start), "rule": NOTIFICATION_RULE,
                "text": (f"threshold expected on {when} (forecast of {known.date().isoformat()}); "
                         f"notify by {notify_by(start)}")}
    return {"status": "not reached", "date": None, "time": None, "basis": None, "window_starts": None,
            "notify_by": None, "rule": NOTIFICATION_RULE,
            "text": "threshold not reached" + ("" if known_at is None else ", and not expected under the plan given")}


def notification_of(traces, summary: dict, result: dict, *, planned_steps: int | None = None,
                    planned_tokens: int | None = None, approaching: float = DEFAULT_APPROACHING, now: float | None = None) -> dict:
    """The notification timing of opened traces: the actual crossing from the steps when the
    threshold was reached, else, given a plan (steps or tokens), the forecast one."""
    limit, _ = threshold(result["base_model_flops"], result["systemic_risk"])
    crossed = crossing_time_of_traces(traces, limit) if result["status"] == "exceeds" else None
    expected = known = None
    crosses = False
    if crossed is None and (planned_steps is not None or planned_tokens is not None) and summary["steps"]:
        span = summary["end_time"] - summary["start_time"] if summary["start_time"] is not None else None
        per_step = span / summary["steps"] if span else None
        projection = forecast(summary["training_flops"], summary["steps"], threshold_flops=limit,
                              measured_tokens=summary["tokens"], planned_steps=planned_steps,
                              planned_tokens=planned_tokens, seconds_per_step=per_step, approaching=approaching)
        known = now if now is not None else dt.datetime.now(dt.timezone.utc).timestamp()
        expected = expected_crossing_time(projection, summary["end_time"], per_step)
        crosses = projection["crosses_threshold"]
    return notification_timing(crossed_at=crossed, expected_at=expected, known_at=known, forecast_crosses=crosses)
