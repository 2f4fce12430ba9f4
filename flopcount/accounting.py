"""Per-step accumulation and roll-ups of counted FLOPs.

``StepAccumulator`` collects the open step, keyed (phase, category, module, op).
``StepRecord`` is a closed step. ``Rollup`` adds records into run totals with memory that does
not grow with the number of steps; ``Rollup.summary()`` produces the dict that
``Meter.summary()`` and ``flopcount summarize --json`` share.
"""
from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .conventions import CATEGORIES, EXCLUDED_PHASES, NO_MODULE, ROOT_MODULE, TRAINING_PHASES

SUMMARY_SCHEMA = "flopcount.summary/1"


class StepAccumulator:
    """FLOPs and call counts of the step being recorded. Safe to update from autograd threads."""

    def __init__(self) -> None:
        self.flops: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self.calls: Counter[tuple[str, str]] = Counter()  # (op, phase) -> calls
        self.uncounted: Counter[str] = Counter()
        self.collectives: Counter[str] = Counter()  # communication op -> calls
        self.collective_bytes: Counter[str] = Counter()  # communication op -> bytes moved
        self.lock = threading.Lock()

    def add(self, phase: str, module: str, op: str, works) -> None:
        with self.lock:
            for category, flops, phase_override in works:
                self.flops[(phase_override or phase, category, module, op)] += flops
            self.calls[(op, phase)] += 1

    def add_repeated(self, booked) -> None:
        """Many calls at once (the native backend): ``booked`` holds (entries, calls key, calls),
        where entries are ((phase, category, module, op), FLOPs of one call) and the calls key
        (op, phase): what ``add`` books for one call, times the calls."""
        flops, calls = self.flops, self.calls
        with self.lock:
            for entries, calls_key, count in booked:
                for flops_key, per_call in entries:
                    flops[flops_key] += per_call * count
                calls[calls_key] += count

    def add_uncounted(self, op: str) -> None:
        with self.lock:
            self.uncounted[op] += 1

    def add_collective(self, op: str, nbytes: int) -> None:
        with self.lock:
            self.collectives[op] += 1
            self.collective_bytes[op] += nbytes

    def empty(self) -> bool:
        return not (self.flops or self.uncounted or self.collectives)


@dataclass
class StepRecord:
    """One closed step of one rank."""

    step: int
    start_time: float
    end_time: float
    tokens: int | None
    samples: int | None
    flops: dict[tuple[str, str, str, str], int]
    calls: dict[tuple[str, str], int]
    uncounted: dict[str, int]
    training_phases: frozenset[str] = TRAINING_PHASES
    collectives: dict[str, int] = field(default_factory=dict)  # communication op -> calls (0 FLOP)
    collective_bytes: dict[str, int] = field(default_factory=dict)  # communication op -> bytes
    # Work after the last optimizer step (a final evaluation, a trailing zero_grad, a save):
    # counted in its phases, but not a training step (``steps`` leaves it out).
    trailing: bool = False
    dark_modules: dict[str, str] = field(default_factory=dict)  # module -> class (capture/dark.py)

    def phase_totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (phase, _, _, _), f in self.flops.items():
            out[phase] += f
        return dict(out)

    def category_totals(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (_, category, _, _), f in self.flops.items():
            out[category] += f
        return dict(out)

    @property
    def training_flops(self) -> int:
        return sum(f for (phase, _, _, _), f in self.flops.items() if phase in self.training_phases)

    @property
    def hardware_flops(self) -> int:
        return sum(self.flops.values())


def truncate_module(name: str, depth: int | None) -> str:
    if depth is None or name in (ROOT_MODULE, NO_MODULE):
        return name
    return ".".join(name.split(".")[:depth])


@dataclass
class Rollup:
    """Run totals over any number of steps (and, in the summarizer, ranks and runs)."""

    training_phases: set[str] = field(default_factory=lambda: set(TRAINING_PHASES))
    by_phase_category: defaultdict = field(default_factory=lambda: defaultdict(int))
    by_module: defaultdict = field(default_factory=lambda: defaultdict(int))
    by_module_training: defaultdict = field(default_factory=lambda: defaultdict(int))
    by_op: defaultdict = field(default_factory=lambda: defaultdict(int))
    op_calls: Counter = field(default_factory=Counter)
    uncounted: Counter = field(default_factory=Counter)
    collectives: Counter = field(default_factory=Counter)
    collective_bytes: Counter = field(default_factory=Counter)
    dark_modules: dict = field(default_factory=dict)  # module name -> class name (capture/dark.py)
    steps: int = 0  # optimizer steps: trailing records are not steps
    trailing_flops: int = 0  # FLOPs of the work after the last optimizer step (in the totals too)
    tokens: int | None = None
    samples: int | None = None
    world_size: int = 1
    ranks: set[int] = field(default_factory=lambda: {0})
    first_time: float | None = None
    last_time: float | None = None

    def add(self, record: StepRecord) -> None:
        self.training_phases |= record.training_phases
        for (phase, category, module, op), f in record.flops.items():
            self.by_phase_category[(phase, category)] += f
            self.by_module[module] += f
            if phase in record.training_phases:
                self.by_module_training[module] += f
            self.by_op[op] += f
        for (op, _), n in record.calls.items():  # one op may run in several phases
            self.op_calls[op] += n
        self.uncounted.update(record.uncounted)
        self.collectives.update(record.collectives)
        self.collective_bytes.update(record.collective_bytes)
        self.dark_modules.update(getattr(record, "dark_modules", {}))
        if record.trailing:
            self.trailing_flops += record.hardware_flops
        else:
            self.steps += 1
        if record.tokens is not None:
            self.tokens = (self.tokens or 0) + int(record.tokens)
        if record.samples is not None:
            self.samples = (self.samples or 0) + int(record.samples)
        self.first_time = record.start_time if self.first_time is None else min(self.first_time, record.start_time)
        self.last_time = record.end_time if self.last_time is None else max(self.last_time, record.end_time)

    @property
    def training_flops(self) -> int:
        return sum(f for (p, _), f in self.by_phase_category.items() if p in self.training_phases)

    @property
    def hardware_flops(self) -> int:
        return sum(self.by_phase_category.values())

    def summary(self, module_depth: int | None = None) -> dict:
        by_phase: dict[str, int] = defaultdict(int)
        by_category: dict[str, int] = {c: 0 for c in CATEGORIES}
        training_by_category: dict[str, int] = {c: 0 for c in CATEGORIES}
        by_phase_category: dict[str, dict[str, int]] = defaultdict(dict)
        for (phase, category), f in sorted(self.by_phase_category.items()):
            by_phase[phase] += f
            by_category[category] = by_category.get(category, 0) + f
            by_phase_category[phase][category] = f
            if phase in self.training_phases:
                training_by_category[category] = training_by_category.get(category, 0) + f
        modules: dict[str, int] = defaultdict(int)
        modules_training: dict[str, int] = defaultdict(int)
        for name, f in self.by_module.items():
            modules[truncate_module(name, module_depth)] += f
        for name, f in self.by_module_training.items():
            modules_training[truncate_module(name, module_depth)] += f
        return {
            "schema": SUMMARY_SCHEMA,
            "training_flops": self.training_flops,
            "hardware_flops": self.hardware_flops,
            "gemm_training_flops": sum(training_by_category.get(c, 0) for c in ("matmul", "attention", "conv")),
            "by_phase": dict(by_phase),
            "by_category": by_category,
            "training_by_category": training_by_category,
            "by_phase_category": dict(by_phase_category),
            "by_module": dict(sorted(modules.items(), key=lambda kv: -kv[1])),
            "by_module_training": dict(sorted(modules_training.items(), key=lambda kv: -kv[1])),
            "by_op": {op: {"flops": self.by_op.get(op, 0), "calls": self.op_calls.get(op, 0)}
                      for op in sorted(set(self.by_op) | set(self.op_calls), key=lambda o: -self.by_op.get(o, 0))},
            "steps": self.steps,
            "trailing_flops": self.trailing_flops,
            "tokens": self.tokens,
            "samples": self.samples,
            "world_size": self.world_size,
            "ranks": sorted(self.ranks),
            "uncounted_ops": dict(self.uncounted.most_common()),
            "dark_modules": dict(sorted(self.dark_modules.items())),
            "missing_ranks": [], "unfinished_ranks": [], "rank_problems": [],  # traces: summary.py
            "collective_calls": sum(self.collectives.values()),
            "collective_bytes": sum(self.collective_bytes.values()),
            "collectives": {op: {"calls": n, "bytes": self.collective_bytes.get(op, 0)}
                            for op, n in sorted(self.collectives.items(), key=lambda kv: -self.collective_bytes[kv[0]])},
            "training_phases": sorted(self.training_phases),
            "excluded_phases": sorted(EXCLUDED_PHASES | (set(by_phase) - self.training_phases)),
            "start_time": self.first_time,
            "end_time": self.last_time,
        }
