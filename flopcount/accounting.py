"""Per-step accumulation of counted FLOPs, and closed steps as columnar batches.

``StepAccumulator`` collects the open step, keyed (phase, category, module, op).
``StepRecord`` is a closed step; ``StepRecord.to_batches()`` turns it into the rows of the trace
tables (trace/schema.py), keyed by column name. ``StepWindow`` holds the batches of the steps
not yet handed on (the trace writer's flush window; the live meter's steps not yet added to its
totals) and makes them one Arrow record batch per table. Totals are summed in one place:
``summary.summarize_batches``, for the live meter and the written traces alike.
"""
from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from .conventions import BUILTIN_PHASES, TRAINING_PHASES
from .errors import BadInput
from .resources.rows import energy_columns
from .trace.schema import (BREAKDOWN_KINDS, CATEGORY_COLUMNS, INT64_MAX, PHASE_COLUMNS, USER_PHASE_COLUMN, column_names,
                           record_batch)

# The breakdown columns of a step's own rows: the key (kind, phase, ...) and the value; the
# writer's identity (run, rank, segment) and the window (first and last step) complete a row.
KEY_COLUMNS = tuple(column_names("breakdown", "key"))
ROW_COLUMNS = (*KEY_COLUMNS, *column_names("breakdown", "value"))
_KIND_ORDER = {kind: i for i, kind in enumerate(BREAKDOWN_KINDS)}
_KIND = KEY_COLUMNS.index("kind")


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

    def add_totals(self, flops: dict, calls: dict) -> None:
        """Totals of many calls summed elsewhere (the native backend's repeated keys): FLOPs by
        (phase, category, module, op) and calls by (op, phase), added as they are."""
        with self.lock:
            _add_at_c_speed(self.flops, flops)
            _add_at_c_speed(self.calls, calls)

    def add_uncounted(self, op: str) -> None:
        with self.lock:
            self.uncounted[op] += 1

    def add_collective(self, op: str, nbytes: int) -> None:
        with self.lock:
            self.collectives[op] += 1
            self.collective_bytes[op] += nbytes

    def empty(self) -> bool:
        return not (self.flops or self.uncounted or self.collectives)


def _add_at_c_speed(into: dict, totals: dict) -> None:
    """``into[key] += value`` for each item of ``totals``, with Python work only for the keys both
    hold: ``dict.update`` (not Counter's, which adds in Python) keeps a held key's place and
    appends the others in ``totals``' order, as that loop would; the held values are added back."""
    held = [(key, into[key]) for key in into.keys() & totals.keys()] if into else ()
    dict.update(into, totals)
    for key, value in held:
        into[key] += value


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
    energy: object = None  # resources.StepEnergy read at the step's end, None when not read

    @property
    def training_flops(self) -> int:
        return sum(f for (phase, _, _, _), f in self.flops.items() if phase in self.training_phases)

    @property
    def hardware_flops(self) -> int:
        return sum(self.flops.values())

    # Set by to_batches: what it derived from this step's content, for the next step to reuse.
    rows: "StepRows | None" = field(default=None, repr=False, compare=False)

    def content(self) -> tuple:
        """What the trace rows derive from besides the step's time, tokens, samples and energy:
        the booked dicts (their order is the rows' order), dark modules and training phases."""
        return (self.flops, self.calls, self.uncounted, self.collectives, self.collective_bytes, self.dark_modules,
                self.training_phases)

    def to_batches(self, previous: "StepRecord | None" = None) -> dict[str, dict[str, list]]:
        """This step as the rows of the trace tables, column name -> values (trace/schema.py):
        ``steps``, one row without the writer's columns (run_id, rank, world_size, segment and the
        devices, which ``StepWindow.batches`` adds), and ``breakdown``, one row per key
        (KEY_COLUMNS and ``value``). Raises BadInput when the step's FLOPs do not fit an int64 column.

        ``previous``: the step closed before this one; when its content is the same (a steady
        training loop), its ``StepRows`` are reused whole, the same breakdown lists included."""
        last = previous.rows if previous is not None else None
        self.rows = rows = last if last is not None and last.derived_from(self) else StepRows.of(self)
        steps = {"step": self.step, "start_time": self.start_time, "end_time": self.end_time,
                 "tokens": self.tokens, "samples": self.samples, **rows.sums,
                 **energy_columns(self.energy), "trailing": bool(self.trailing)}
        return {"steps": {name: [value] for name, value in steps.items()}, "breakdown": rows.breakdown}


@dataclass(frozen=True, eq=False)
class StepRows:
    """What ``StepRecord.to_batches`` derives from a step's content (``StepRecord.content``): the
    sums of its ``steps`` row (totals, phases, categories, counts) and its ``breakdown`` rows,
    which nobody changes once made. ``content`` holds copies of what they were derived from."""

    content: tuple
    sums: dict[str, int]
    breakdown: dict[str, list]

    def derived_from(self, record: StepRecord) -> bool:
        """Whether ``record``'s content equals this one's, in order: then so are its rows. Dict
        equality ignores order, so the keys' order is compared as well (C speed, no per-key Python)."""
        content = record.content()
        return content == self.content and all(
            list(mine) == list(theirs) for mine, theirs in zip(self.content, content) if isinstance(mine, dict))

    @classmethod
    def of(cls, record: StepRecord) -> "StepRows":
        phases: dict[str, int] = defaultdict(int)
        categories: dict[str, int] = defaultdict(int)
        for (phase, category, _, _), f in record.flops.items():
            phases[phase] += f
            categories[category] += f
        hardware = sum(phases.values())
        if hardware > INT64_MAX:
            raise BadInput(f"flopcount: step {record.step} has {hardware} FLOPs, more than a trace column holds "
                           "(2**63-1); close steps more often")
        training = record.training_phases
        sums = {"training_flops": sum(f for phase, f in phases.items() if phase in training),
                "hardware_flops": hardware,
                **{column: phases.get(phase, 0) for phase, column in PHASE_COLUMNS.items()},
                USER_PHASE_COLUMN: sum(f for phase, f in phases.items() if phase not in BUILTIN_PHASES),
                **{column: categories.get(category, 0) for category, column in CATEGORY_COLUMNS.items()},
                "uncounted_calls": sum(record.uncounted.values()),
                "collective_calls": sum(record.collectives.values()),
                "collective_bytes": sum(record.collective_bytes.values())}
        flops, calls, dark = record.flops, record.calls, record.dark_modules
        phase, category, module, op = (list(c) for c in zip(*flops)) if flops else ([], [], [], [])
        kinds = [  # one part per kind, each column by name (absent key columns are null)
            _kind_rows("flops", list(flops.values()), phase=phase, category=category, module=module, op=op,
                       training=[p in training for p in phase]),
            _kind_rows("calls", list(calls.values()), phase=[p for _, p in calls], op=[o for o, _ in calls]),
            _kind_rows("uncounted", list(record.uncounted.values()), op=list(record.uncounted)),
            _kind_rows("collective_calls", list(record.collectives.values()), op=list(record.collectives)),
            _kind_rows("collective_bytes", list(record.collective_bytes.values()), op=list(record.collective_bytes)),
            _kind_rows("dark_module", [1] * len(dark), module=list(dark), op=list(dark.values())),  # one step in which each was dark
        ]
        breakdown = {name: [v for part in kinds for v in part[name]] for name in ROW_COLUMNS}
        content = tuple(dict(part) if isinstance(part, dict) else part for part in record.content())
        return cls(content, sums, breakdown)


def _kind_rows(kind: str, values: list, **keys: list) -> dict[str, list]:
    """The breakdown columns of one kind's rows: ``keys`` by name, the other key columns null."""
    n = len(values)
    return {"kind": [kind] * n, "value": values, **{name: keys.get(name, [None] * n) for name in KEY_COLUMNS if name != "kind"}}


class StepWindow:
    """The batches of closed steps not yet handed on: their ``steps`` rows, and their
    ``breakdown`` rows summed by key. ``on_full`` is called to take them (``batches``) before a
    step whose FLOPs would take a breakdown sum past int64, and once ``size`` steps are held.

    Consecutive steps that share one breakdown (``StepRows``: a steady loop) are held as that
    breakdown and how many steps hold it: its rows are summed once, times the steps, when another
    breakdown comes or the window is taken (same sums, same key order: steps are summed in order)."""

    def __init__(self, size: int, on_full: Callable[[], None]) -> None:
        self.size, self.on_full = size, on_full
        self._reset()

    def _reset(self) -> None:
        self.steps: defaultdict[str, list] = defaultdict(list)
        self.keys: defaultdict[tuple, int] = defaultdict(int)  # KEY_COLUMNS -> summed value
        self.repeated: list = [None, 0]  # the last steps' shared breakdown, not yet in keys, and their count
        self.rows = 0
        self.training_flops = self.hardware_flops = 0  # sums of the steps held, as Python ints

    def add(self, batches: dict[str, dict[str, list]]) -> None:
        steps, breakdown = batches["steps"], batches["breakdown"]
        hardware = sum(steps["hardware_flops"])
        if self.rows and self.hardware_flops + hardware > INT64_MAX:
            self.on_full()  # keep every breakdown sum inside int64
        for name, values in steps.items():
            self.steps[name].extend(values)
        repeated = self.repeated
        if repeated[0] is breakdown:
            repeated[1] += 1
        else:
            self._sum_repeated()
            self.repeated = [breakdown, 1]
        self.rows += len(steps["step"])
        self.training_flops += sum(steps["training_flops"])
        self.hardware_flops += hardware
        if self.rows >= self.size:
            self.on_full()

    def _sum_repeated(self) -> None:
        """Add the repeated breakdown's rows, times its steps, to ``keys`` (KEY_COLUMNS order)."""
        breakdown, times = self.repeated
        if breakdown is None:
            return
        keys = self.keys
        for key, value in zip(zip(*(breakdown[c] for c in KEY_COLUMNS)), breakdown["value"]):
            keys[key] += value * times
        self.repeated = [None, 0]

    def __len__(self) -> int:
        return self.rows

    def batches(self, constants: dict) -> dict[str, pa.RecordBatch]:
        """The steps held as one record batch per table, the writer's columns from ``constants``
        (run_id, rank, world_size, segment, device_name, device_count); empties the window."""
        steps = self.steps
        window = {"first_step": steps["step"][0], "last_step": steps["step"][-1]} if self.rows else {}
        self._sum_repeated()
        keys = sorted(self.keys.items(), key=lambda kv: _KIND_ORDER[kv[0][_KIND]])  # kind by kind, first seen first
        columns = list(zip(*((*key, value) for key, value in keys))) if keys else [()] * len(ROW_COLUMNS)
        breakdown = dict(zip(ROW_COLUMNS, columns))
        out = {"steps": record_batch("steps", steps, constants, self.rows),
               "breakdown": record_batch("breakdown", breakdown, {**constants, **window}, len(keys))}
        self._reset()
        return out
