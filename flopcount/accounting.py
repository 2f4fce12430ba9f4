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
from .resources.rows import ENERGY_J_COLUMNS, energy_columns
from .trace.schema import (BREAKDOWN_KINDS, CATEGORY_COLUMNS, INT64_MAX, PHASE_COLUMNS, USER_PHASE_COLUMN, column_names,
                           record_batch)

# The breakdown columns of a step's own rows: the key (kind, phase, ...) and the value; the
# writer's identity (run, rank, segment) and the window (first and last step) complete a row.
KEY_COLUMNS = tuple(column_names("breakdown", "key"))
ROW_COLUMNS = (*KEY_COLUMNS, *column_names("breakdown", "value"))
_KIND_ORDER = {kind: i for i, kind in enumerate(BREAKDOWN_KINDS)}
_KIND = KEY_COLUMNS.index("kind")


RECIPE_MAX = 64  # totals a step holds unmerged, and the longest recipe kept (a steady step has a few)


class StepAccumulator:
    """FLOPs and call counts of the step being recorded. Safe to update from autograd threads.

    Totals added whole (``add_totals``, ``add_repeated``: the native backend) wait in ``pending``
    and join ``flops`` and ``calls`` in order when those are read: a step whose ``recipe`` repeats
    the last one's need never merge them. ``recipe`` lists what was booked into ``flops`` and
    ``calls``, in order, while all of it came whole (the reused totals themselves; the sums of
    plans), else it is None: two steps with equal recipes hold equal ``flops`` and ``calls``, in
    the same order (``same_recipe``)."""

    def __init__(self) -> None:
        self._flops: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self._calls: Counter[tuple[str, str]] = Counter()  # (op, phase) -> calls
        self.uncounted: Counter[str] = Counter()
        self.collectives: Counter[str] = Counter()  # communication op -> calls
        self.collective_bytes: Counter[str] = Counter()  # communication op -> bytes moved
        self.pending: list[tuple[dict, dict]] = []  # (FLOPs, calls) added whole, not yet in flops and calls
        self.recipe: list | None = []
        self.lock = threading.RLock()  # reentrant: a reader holding it merges the pending totals

    @property
    def flops(self) -> defaultdict[tuple[str, str, str, str], int]:
        """FLOPs by (phase, category, module, op)."""
        with self.lock:
            if self.pending:
                self._merge()
            return self._flops

    @property
    def calls(self) -> Counter[tuple[str, str]]:
        """Calls by (op, phase)."""
        with self.lock:
            if self.pending:
                self._merge()
            return self._calls

    def _merge(self) -> None:
        for flops, calls in self.pending:
            _add_at_c_speed(self._flops, flops)
            _add_at_c_speed(self._calls, calls)
        self.pending = []

    def add(self, phase: str, module: str, op: str, works) -> None:
        with self.lock:
            if self.pending:
                self._merge()  # keys in the order booked
            for category, flops, phase_override in works:
                self._flops[(phase_override or phase, category, module, op)] += flops
            self._calls[(op, phase)] += 1
            self.recipe = None

    def add_repeated(self, booked) -> None:
        """Many calls at once (the native backend): ``booked`` holds (entries, calls key, calls),
        where entries are ((phase, category, module, op), FLOPs of one call) and the calls key
        (op, phase): what ``add`` books for one call, times the calls."""
        if booked:
            self._add(*_sums(booked), "added")

    def add_totals(self, flops: dict, calls: dict) -> None:
        """Totals of many calls summed elsewhere (the native backend's repeated keys): FLOPs by
        (phase, category, module, op) and calls by (op, phase), added as they are. They are kept
        as they are (pending, recipe): the caller never changes them afterwards."""
        if flops or calls:
            self._add(flops, calls, "totals")

    def _add(self, flops: dict, calls: dict, kind: str) -> None:
        with self.lock:
            self.pending.append((flops, calls))
            if len(self.pending) > RECIPE_MAX:  # a step of many flushes holds its sums, not each flush's
                self._merge()
            if self.recipe is not None:
                self.recipe.append((kind, flops, calls))
                if len(self.recipe) > RECIPE_MAX:
                    self.recipe = None

    def add_uncounted(self, op: str) -> None:
        with self.lock:
            self.uncounted[op] += 1

    def add_collective(self, op: str, nbytes: int) -> None:
        with self.lock:
            self.collectives[op] += 1
            self.collective_bytes[op] += nbytes

    def empty(self) -> bool:
        return not (self.flops or self.uncounted or self.collectives)

    def same_recipe(self, other: "StepAccumulator") -> bool:
        """Whether ``flops`` and ``calls`` were booked as ``other``'s were: then they hold the same,
        in the same order, known without reading them. Totals by identity (their order is the
        keys' order, which equal dicts need not share), the sums of plans by value, in order."""
        mine, theirs = self.recipe, other.recipe
        if mine is None or theirs is None or len(mine) != len(theirs):
            return False
        for (kind, flops, calls), (their_kind, their_flops, their_calls) in zip(mine, theirs):
            if kind != their_kind:
                return False
            if kind == "totals":
                if flops is not their_flops or calls is not their_calls:
                    return False
            elif not (same_in_order(flops, their_flops) and same_in_order(calls, their_calls)):
                return False
        return True


def _sums(booked) -> tuple[dict, dict]:
    """What ``add_repeated(booked)`` adds, by FLOPs key and by calls key, keys in the order first
    booked (the order in which adding them appends the step's new keys)."""
    flops: dict = defaultdict(int)
    calls: dict = defaultdict(int)
    for entries, calls_key, count in booked:
        for flops_key, per_call in entries:
            flops[flops_key] += per_call * count
        calls[calls_key] += count
    return flops, calls


def same_in_order(a: dict, b: dict) -> bool:
    """Equal dicts with their keys in the same order (dict equality ignores the order)."""
    return a == b and list(a) == list(b)


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
    """One closed step of one rank. The Meter's records of steps that book the same (a steady
    loop) share their ``flops`` and ``calls`` dicts: read them, copy them to change them."""

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

    def to_batches(self, rows: "StepRows | None" = None) -> dict[str, dict[str, list]]:
        """This step as the rows of the trace tables, column name -> values (trace/schema.py):
        ``steps``, its rows without the writer's columns (run_id, rank, world_size, segment and the
        devices, which ``StepWindow.batches`` adds), and ``breakdown``, one row per key
        (KEY_COLUMNS and ``value``). A step fits one ``steps`` row unless its FLOPs leave int64:
        then they take several rows of the same step (``StepRows``, docs/traces.md "Integers").

        ``rows``: ``StepRows.of`` a step with the same content, when known (Meter._close_step:
        a step that books what the previous one booked); else derived here."""
        rows = rows if rows is not None else StepRows.of(self)
        if len(rows.sums) == 1:
            steps = {"step": self.step, "start_time": self.start_time, "end_time": self.end_time,
                     "tokens": self.tokens, "samples": self.samples, **rows.sums[0],
                     **energy_columns(self.energy), "trailing": bool(self.trailing)}
            return {"steps": {name: [value] for name, value in steps.items()}, "breakdown": rows.breakdown}
        return {"steps": self._split_rows(rows), "breakdown": rows.breakdown}

    def _split_rows(self, rows: "StepRows") -> dict[str, list]:
        """The ``steps`` rows of a step whose FLOPs take several rows: each row a slice of the
        step's time and energy in proportion to its FLOPs (``rows.bounds``), so time, energy and
        FLOP/s add up as for one row; the step's tokens and samples in its first row."""
        energy = energy_columns(self.energy)
        span = self.end_time - self.start_time
        times = [self.start_time + span * b for b in rows.bounds[:-1]] + [self.end_time]
        columns: defaultdict[str, list] = defaultdict(list)
        for i, sums in enumerate(rows.sums):
            share = rows.bounds[i + 1] - rows.bounds[i]
            row = {"step": self.step, "start_time": times[i], "end_time": times[i + 1],
                   "tokens": self.tokens if i == 0 else None, "samples": self.samples if i == 0 else None,
                   **sums, **energy, "trailing": bool(self.trailing)}
            for name in ENERGY_J_COLUMNS:
                if row[name] is not None:
                    row[name] = row[name] * share
            for name, value in row.items():
                columns[name].append(value)
        return dict(columns)


@dataclass(frozen=True, eq=False)
class StepRows:
    """What ``StepRecord.to_batches`` derives from a step's content (its FLOPs, calls, uncounted
    and communication counts, dark modules and training phases; not its time, tokens, samples or
    energy): the sums of its ``steps`` rows and its ``breakdown`` rows. Steps with the same content
    share one (and a StepWindow sums a shared breakdown once): nobody changes them once made.

    ``sums``: one row's sums, or, for a step over INT64_MAX FLOPs, several rows' (``split_flops``:
    each row's FLOP columns add up as one row's do, and the rows add up to the step; the counts
    in the first row). ``bounds``: where each row's share of the step's time and energy starts,
    as a fraction of it (its share of the training FLOPs, else of all), and 1.0."""

    sums: tuple[dict[str, int], ...]
    breakdown: dict[str, list]
    bounds: tuple[float, ...] = (0.0, 1.0)

    @classmethod
    def of(cls, record: StepRecord) -> "StepRows":
        """The rows of ``record``'s content."""
        training = record.training_phases
        sums = _flop_sums(record.flops, training)
        counts = {"uncounted_calls": sum(record.uncounted.values()),
                  "collective_calls": sum(record.collectives.values()),
                  "collective_bytes": sum(record.collective_bytes.values())}
        if sums["hardware_flops"] <= INT64_MAX:
            rows, bounds = ({**sums, **counts},), (0.0, 1.0)
        else:  # a step beyond a trace column's int64: several rows of the same step
            pieces = [_flop_sums(piece, training) for piece in split_flops(record.flops)]
            rows = tuple({**piece, **(counts if i == 0 else dict.fromkeys(counts, 0))} for i, piece in enumerate(pieces))
            bounds = _bounds([p["training_flops"] for p in pieces] if sums["training_flops"] else
                             [p["hardware_flops"] for p in pieces])
        flops, calls, dark = record.flops, record.calls, record.dark_modules
        phase, category, module, op = (list(c) for c in zip(*flops)) if flops else ([], [], [], [])
        kinds = [  # one part per kind, each column by name (absent key columns are null)
            _kind_rows("flops", list(flops.values()), phase=phase, category=category, module=module, op=op,
                       training=[p in training for p in phase]),
            _kind_rows("calls", list(calls.values()), phase=[p for _, p in calls], op=[o for o, _ in calls]),
            _kind_rows("uncounted", list(record.uncounted.values()), op=list(record.uncounted)),
            _kind_rows("collective_calls", list(record.collectives.values()), op=list(record.collectives)),
            _kind_rows("collective_bytes", list(record.collective_bytes.values()), op=list(record.collective_bytes)),
            _kind_rows("dark_module", [1] * len(dark), module=list(dark),
                       op=list(dark.values())),  # one step in which each was dark
        ]
        return cls(rows, {name: [v for part in kinds for v in part[name]] for name in ROW_COLUMNS}, bounds)


def _flop_sums(flops: dict, training: frozenset) -> dict[str, int]:
    """The FLOP columns of a steps row holding ``flops`` (by (phase, category, module, op))."""
    phases: dict[str, int] = defaultdict(int)
    categories: dict[str, int] = defaultdict(int)
    for (phase, category, _, _), f in flops.items():
        phases[phase] += f
        categories[category] += f
    return {"training_flops": sum(f for phase, f in phases.items() if phase in training),
            "hardware_flops": sum(phases.values()),
            **{column: phases.get(phase, 0) for phase, column in PHASE_COLUMNS.items()},
            USER_PHASE_COLUMN: sum(f for phase, f in phases.items() if phase not in BUILTIN_PHASES),
            **{column: categories.get(category, 0) for category, column in CATEGORY_COLUMNS.items()}}


def int64_pieces(value: int) -> list[int]:
    """``value`` (>= 0) as the fewest values of at most INT64_MAX (a trace column's range) that add
    up to it: itself when it fits, else INT64_MAX as often as it goes and the remainder."""
    if value <= INT64_MAX:
        return [value]
    full, rest = divmod(value, INT64_MAX)
    return [INT64_MAX] * full + ([rest] if rest else [])


def split_flops(flops: dict) -> list[dict]:
    """``flops`` (key -> FLOPs) as the fewest dicts whose sums fit int64, filled in key order;
    a key that does not fit the room left is split across the next ones. They add up to ``flops``."""
    pieces: list[dict] = []
    piece: dict = {}
    room = INT64_MAX
    for key, value in flops.items():
        while value > room:
            if room:
                piece[key] = room
            value -= room
            pieces.append(piece)
            piece, room = {}, INT64_MAX
        piece[key] = value
        room -= value
    pieces.append(piece)
    return pieces


def _bounds(weights: list[int]) -> tuple[float, ...]:
    """Where each weight's share of the whole starts (0.0 first), and 1.0: exact integer running
    sums, divided once."""
    total, running, out = sum(weights), 0, [0.0]
    for weight in weights[:-1]:
        running += weight
        out.append(running / total)
    return (*out, 1.0)


def _kind_rows(kind: str, values: list, **keys: list) -> dict[str, list]:
    """The breakdown columns of one kind's rows: ``keys`` by name, the other key columns null."""
    n = len(values)
    return {"kind": [kind] * n, "value": values, **{name: keys.get(name, [None] * n) for name in KEY_COLUMNS if name != "kind"}}


class StepWindow:
    """The batches of closed steps not yet handed on: their ``steps`` rows, and their
    ``breakdown`` rows summed by key. ``on_full`` is called to take them (``batches``) before a
    step whose FLOPs would take a breakdown sum past int64, and once ``size`` rows are held. A
    single step past int64 is taken alone, its sums past int64 as several rows of one key.

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
            self.on_full()  # keep the breakdown sums inside int64 (one row per key) while steps fit
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
        # A sum beyond int64 (one step over INT64_MAX FLOPs) takes several rows of the same key.
        rows = [(*key, piece) for key, value in keys
                for piece in ((value,) if value <= INT64_MAX else int64_pieces(value))]
        columns = list(zip(*rows)) if rows else [()] * len(ROW_COLUMNS)
        breakdown = dict(zip(ROW_COLUMNS, columns))
        out = {"steps": record_batch("steps", steps, constants, self.rows),
               "breakdown": record_batch("breakdown", breakdown, {**constants, **window}, len(rows))}
        self._reset()
        return out
