"""Meter: the context manager users wrap around training. Steps, phases, live totals."""
from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from dataclasses import dataclass
from operator import itemgetter

from ._torch import require_torch

require_torch()  # one line saying how to install PyTorch >= 2.5, not a ModuleNotFoundError from below
import torch  # noqa: E402

from .accounting import StepAccumulator, StepRecord, StepRows, same_in_order
from .budget import STOP, BudgetGuard, job_training_flops
from .capture import compile as compiled_regions
from .capture.context import Context, HookGuard, settle_phase
from .capture.counter import Counter, UncountedOpError
from .capture.dark import DarkModuleWatch
from .config import BACKENDS, MeterConfig, init_signature  # noqa: F401  (BACKENDS: also imported from here)
from .conventions import BACKWARD, BUILTIN_PHASES, EVAL, NO_GRAD_TRAINING_PHASES, PROVISIONAL_NO_GRAD, TRAINING_PHASES
from .distributed import rank_and_world_size
from .errors import BadInput
from .integrations import dataloader as dataloader_workers
from .resources import device_columns, open_energy_meter
from .summary import LiveTotals, summarize_batches
from .trace.writer import TraceWriter, WriterIdentity

compiled_regions.install()  # before any torch.compile, so that compiled regions are countable

_PHASE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class Meter:
    """Counts the FLOPs of everything that runs inside ``with meter:``.

    Steps close on ``step()``; if the program never calls it, a step closes after each
    ``optimizer.step()`` (at the next op that does work, so zero_grad and friends stay in it);
    ``auto_steps=False`` leaves closing steps to ``step()`` alone (the framework callbacks).
    ``steps`` counts optimizer steps: work after the last one (a final evaluation, a trailing
    zero_grad, a save) is counted in its phases in a record marked ``trailing``, not a step.
    ``budget``: a fraction of the threshold in (0, 1] or FLOP above 1; a ``BudgetWarning`` at
    ``budget_warn_at`` of it, and, when the next step would reach it (budget.py), by
    ``budget_action``: ``BudgetExceeded`` (traces flushed) from ``step()`` or ``optimizer.step()``
    ("raise"), or ``should_stop`` set for the caller to stop ("stop", the framework callbacks).
    ``energy``: read the GPUs' NVML energy counters and the host's RAPL counters at every step
    boundary (docs/energy.md); ``devices``: the CUDA devices this process trains on (default:
    the rank's device under a launcher, else those holding its memory).
    ``signing_key``: an Ed25519 private key file that signs every manifest entry (default:
    FLOPCOUNT_SIGNING_KEY); ``ledger``: a file or URI outside ``out`` that gets each closing trace
    digest (docs/traces.md, "Integrity").
    """

    def __init__(self, out=None, *, config: MeterConfig | None = None, **options) -> None:
        """``Meter(out, **options)`` or ``Meter(config=MeterConfig(...))``: the options, their
        defaults and their checks are MeterConfig's (config.py), raised here as one-line errors."""
        if config is None:
            config = MeterConfig(out=out, **options)
        elif out is not None or options:
            config = config.replace(**({"out": out} if out is not None else {}), **options)
        self.config = config
        self.out = config.out
        self.requested_backend = config.backend
        self.base_model = config.base_model
        self.base_model_flops = config.base_model_flops
        self.strict = config.strict
        self.module_depth = config.module_depth
        self.run_id = config.run_id
        self.flush_every = config.flush_every
        self.track_modules = config.track_modules
        self.warn = config.warn
        self.sync_every = config.sync_every  # steps between automatic job-wide totals (one all-reduce)
        self.job_totals: dict | None = None  # the latest job-wide totals (all ranks)
        self.budget = None if config.budget is None else BudgetGuard.create(
            config.budget, config.budget_warn_at, base_model=config.base_model,
            base_model_flops=config.base_model_flops)
        self.should_stop = False  # budget_action="stop": the budget guard asks the caller to stop
        self.rollup = LiveTotals()  # the live totals of the closed steps (summary.py)
        self.energy_enabled, self.devices = bool(config.energy), config.devices  # docs/energy.md
        # The trace writer uses them (trace/writer.py).
        self.signing_key, self.ledger = config.signing_key, config.ledger
        self.energy = None  # the EnergyMeter while active: devices, NVML / RAPL readers
        self.training_phases = set(TRAINING_PHASES)
        self.user_phases: dict[str, bool] = {}
        self.step_index = 0
        self.last_step: StepRecord | None = None
        self._derived: _Derived | None = None  # what the last closed step derived from its accumulator
        self.backend: str | None = None
        self.rank, self.world_size = 0, 1
        self.writer = None
        self._active = False
        self._entered_in: int | None = None  # the pid of the process that entered the meter
        self._explicit_steps = not config.auto_steps  # auto_steps=False: only step() closes steps
        self._caller_counts_steps = not config.auto_steps  # a framework callback: each step() is a trainer step
        self._optimizer_steps_closed = 0  # optimizer steps seen when the last step closed
        self._pending_end: float | None = None
        self._step_start = 0.0

    # ---- context manager --------------------------------------------------------------------
    def __enter__(self) -> "Meter":
        if self._active:
            raise RuntimeError("flopcount: this meter is already active; nest a new flopcount.meter() instead")
        self.guard = HookGuard(warn=self.warn)  # failures inside hooks: recorded, never raised
        self.context = Context(on_optimizer_step=self._on_optimizer_step, track_modules=self.track_modules,
                               guard=self.guard)
        # The Counter reports the first work after optimizer.step() to the step clock (dispatch).
        self.counter = Counter(self.context, strict=self.strict, warn=self.warn, on_work=self._step_boundary)
        self.capture = self._make_capture()
        self.rank, self.world_size = rank_and_world_size()
        self.energy = open_energy_meter(self.world_size, devices=self.devices, enabled=self.energy_enabled)
        self.writer = self.open_writer()
        self.context.install()
        self.dark = DarkModuleWatch(self.context)  # capture/dark.py: after the Context, which names modules
        if self.track_modules:
            self.context.module_watch = self.dark
        from .integrations.deepspeed import watch_opaque_kernels

        self.context.handles += watch_opaque_kernels(self.counter)  # removed with the context's hooks
        from .integrations.kernels import watch_api_kernels

        self.context.handles += watch_api_kernels(self.counter)  # libraries counted at their Python API
        dataloader_workers.install()  # before a DataLoader iterated under this meter starts its workers
        self.capture.__enter__()
        compiled_regions.attach(self)  # torch.compile regions, Triton launches, CUDA graph replays
        self._active = True
        self._entered_in = os.getpid()  # a forked child holds a copy of the meter (stop_in_worker)
        self._step_start = time.time()
        self.energy.start(self._step_start)  # baseline of the cumulative counters
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._active:  # stopped in this process (stop_in_worker: a forked child unwinding
            return False  # through `with`, a DataLoader worker) or exited: nothing is this exit's to close
        try:
            compiled_regions.detach(self)
            self.capture.__exit__(exc_type, exc, tb)
        finally:
            self.context.remove()
            self._active = False
            dark = None
            if not self.counter.acc.empty() or self.dark.holds():
                # Work after the last optimizer step (auto steps) or after the last step() is
                # counted in its phases, in a record marked trailing: it is not a training step.
                try:
                    self._close(end=self._pending_end, trailing=self._pending_end is None)
                except UncountedOpError as error:  # strict dark modules: raised once the writer closed,
                    dark = error  # so that every row and the close entry are written (docs/conventions.md)
            if self.writer is not None:
                self.writer.close(self.summary())
        if dark is not None and exc_type is None:
            raise dark
        return False

    def stop_in_worker(self) -> None:
        """This process is not metered: a DataLoader worker (integrations/dataloader.py; data
        preparation is not the model's training compute) or a forked child (capture/active.py,
        at the fork). Stop seeing its ops and book none of them. A meter this process inherited
        by fork leaves the trace to the process that entered it: its writer (that process's files
        and lease) is not touched here, nor later (``step()`` raises, ``__exit__`` does nothing).
        One entered in this process (``flopcount run`` meters each spawned Python process from
        its start) closes its writer, if it has one: a worker never steps, so it writes nothing."""
        if not self._active:
            return
        self._active = False
        compiled_regions.detach(self)
        try:
            self.capture.discard()
        finally:
            self.context.remove()
        if self.writer is not None and self._entered_in == os.getpid():
            self.writer.close(self.summary())

    def _make_capture(self):
        from .capture.dispatch import DispatchCapture

        if self.requested_backend != "dispatch":
            from .capture import native

            lib = native.load()
            if self.requested_backend == "native" or lib is not None:
                self.backend = "native"  # raises a one-line error if it is not available
                return native.NativeCapture(self.counter, self.context, self._step_boundary, lib)
            if lib is None:
                warnings.warn(f"flopcount: native backend unavailable ({native.load_error()}); "
                              f"using the dispatch backend", stacklevel=3)
        self.backend = "dispatch"
        return DispatchCapture(self.counter)

    # ---- steps ------------------------------------------------------------------------------
    def step(self, tokens=None, samples=None) -> StepRecord:
        """Close the current step; ``tokens``/``samples`` (ints or 0-d tensors) are recorded with it."""
        self._require_active("step()")
        self._explicit_steps = True
        self._pending_end = None
        record = self._close(tokens=tokens, samples=samples, trailing=self._holds_no_optimizer_step())
        if self.budget is not None:
            self._enforce_budget()
        return record

    def _holds_no_optimizer_step(self) -> bool:
        """A plain loop's ``step()`` that closes work without an optimizer step, in a run that
        uses one (the demo's step() after its final evaluation, a step() per micro-batch): not a
        training step, the record is marked trailing. Loops without torch.optim (no optimizer step
        ever seen) and framework callbacks (``auto_steps=False``) count every ``step()``."""
        steps = self.context.optimizer_steps
        return not self._caller_counts_steps and steps > 0 and steps == self._optimizer_steps_closed

    # ---- the step clock: the one place where steps close ---------------------------------------
    # Automatic steps: optimizer.step() ends the open step (``_on_optimizer_step``), which closes
    # before the next op with FLOPs: the capture reports that point (``_step_boundary``: the
    # dispatch backend's Counter at that op, the native backend's flush at the extension's mark).
    # Explicit steps: ``step()``. Either way a step closes in ``_close_step``, which never flushes;
    # ``_close`` flushes the capture first (capture/protocol.py).
    def _on_optimizer_step(self) -> None:
        if not self._explicit_steps:
            if self.budget is not None:  # the budget check needs this step's FLOPs booked
                self.capture.flush()
            self._pending_end = time.time()
            self.capture.mark_step_end()  # the step closes before the next op with FLOPs
            self.dark.step_ended()  # the module calls from now on are the next step's
            if self.budget is not None:  # decide before the next step runs, this open step included
                self._enforce_budget(pending=self._open_training_flops())

    def _step_boundary(self) -> None:
        """The next step's first work arrived: close the step that optimizer.step() ended, with
        the work booked so far (the capture calling this is the one booking: no flush)."""
        if self._pending_end is not None:
            end, self._pending_end = self._pending_end, None
            self._close_step(end=end, ended=True)

    def _open_training_flops(self) -> int:
        acc = self.counter.acc
        counted = self.training_phases | {PROVISIONAL_NO_GRAD}  # the conservative side until the step closes
        with acc.lock:
            return sum(f for (phase, _, _, _), f in acc.flops.items() if phase in counted)

    def _enforce_budget(self, pending: int = 0) -> None:
        """Budget guard (budget.py), the one place that decides: warn, or, when the next step would
        reach the budget, set ``should_stop`` (budget_action="stop": the caller stops its loop) or
        close the step, flush the traces and raise BudgetExceeded ("raise")."""
        if self.budget.check(self, pending) != STOP:
            return
        if self.config.budget_action == "stop":
            self.should_stop = True
            return
        self.capture.flush()
        self._step_boundary()  # the step the optimizer just finished (implicit steps)
        if self.writer is not None:
            self.writer.flush()
        raise self.budget.exceeded(self.step_index - 1)

    def _close(self, tokens=None, samples=None, end: float | None = None, trailing: bool = False) -> StepRecord:
        """Close the open step with everything the capture saw (it books what it holds back first)."""
        self.capture.flush()
        return self._close_step(tokens=tokens, samples=samples, end=end, trailing=trailing)

    def _close_step(self, tokens=None, samples=None, end: float | None = None, trailing: bool = False,
                    ended: bool = False) -> StepRecord:
        """Close the open step with the work booked so far: the record, live totals, the writer.
        ``ended``: it is the step optimizer.step() ended, closing at the next step's first op.
        A step that books what the previous one booked (``_Derived.booked_by``: a steady loop)
        reuses what was derived from it: its settled FLOPs and calls (the records share them),
        dark modules and trace rows."""
        acc = self.counter.take_step()
        training_phases = frozenset(self.training_phases)
        last, self._derived = self._derived, None  # set again once this step is derived whole
        with acc.lock:
            repeats = last is not None and last.booked_by(acc)
            flops, calls = (last.flops, last.calls) if repeats else _settled(acc.flops, acc.calls)
            booked = last.booked if repeats else _copies(acc)
            record = StepRecord(
                step=self.step_index, start_time=self._step_start, end_time=end or time.time(),
                tokens=_as_int(tokens, "tokens"), samples=_as_int(samples, "samples"),
                flops=flops, calls=calls, uncounted=dict(acc.uncounted),  # shared by the steps that repeat it
                training_phases=training_phases,
                collectives=dict(acc.collectives), collective_bytes=dict(acc.collective_bytes),
                trailing=trailing)
        record.dark_modules = self.dark.take(flops, repeated=repeats, ended=ended)  # capture/dark.py
        record.energy = self.energy.sample() if self.energy is not None else None  # step boundary
        if repeats and record.dark_modules == last.dark_modules and training_phases == last.training_phases:
            rows = last.rows  # the same content: the same trace rows
        else:
            rows = StepRows.of(record)
        self._derived = _Derived(acc, booked, flops, calls, dict(record.dark_modules), training_phases, rows)
        batches = record.to_batches(rows)  # the step's trace rows, for the live totals and the writer
        self.rollup.add(batches)
        if self.writer is not None:
            self.writer.write(batches)
        self.last_step = record
        if not trailing:  # a trailing record is no step: the next step takes its number (ranks stay aligned)
            self.step_index += 1
        self._optimizer_steps_closed = self.context.optimizer_steps
        self._step_start = record.end_time
        self.context.reset_backward()
        if self.sync_every is not None and not trailing and self.step_index % self.sync_every == 0:
            self.global_totals()  # a collective: at the same steps on every rank, whatever trailing work each has
        if self.strict and record.dark_modules:
            names = ", ".join(f"{name} ({cls})" for name, cls in record.dark_modules.items())
            raise UncountedOpError(f"flopcount: module(s) whose forward booked no FLOPs: {names}; their work "
                                   "ran outside every capture path (docs/custom_kernels.md); give it a formula "
                                   "or run without strict=True")
        return record

    # ---- phases -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str, training: bool = True):
        """Tag the forward and no-grad work inside the block as phase ``name`` (backward, recompute
        and optimizer work keep their own phase). ``training`` says whether it counts toward
        ``training_flops``. The reserved names ``generation``, ``reference``, ``teacher``, ``reward``
        and ``no_grad_training`` are always training (work that feeds a step's loss); ``eval`` is
        ``evaluating()``. Inside an evaluation every phase is eval."""
        self._require_active("phase()")
        if name == EVAL:
            with self.evaluating():
                yield self
            return
        if name in BUILTIN_PHASES or not _PHASE_NAME.match(str(name)):
            raise BadInput(f"flopcount: phase name {name!r} must be lower-case letters, digits or '_' "
                           f"and not one of {', '.join(p for p in BUILTIN_PHASES if p != EVAL)}")
        if name in NO_GRAD_TRAINING_PHASES and not training:
            raise BadInput(f"flopcount: phase {name!r} is training compute by convention (it feeds the loss); "
                           f"use another name with training=False, or m.evaluating() for held-out evaluation")
        if self.user_phases.setdefault(name, bool(training)) != bool(training):
            raise BadInput(f"flopcount: phase {name!r} was already used with training={not training}")
        if training:
            self.training_phases.add(name)
        self.context.push_user_phase(name)
        try:
            yield self
        finally:
            self.context.pop_user_phase()

    @contextlib.contextmanager
    def evaluating(self):
        """Held-out evaluation: the forward and no-grad work inside the block is phase ``eval``,
        outside ``training_flops``, whatever phases are opened inside it."""
        self._require_active("evaluating()")
        self.context.push_user_phase(EVAL)
        try:
            yield self
        finally:
            self.context.pop_user_phase()

    # ---- results ----------------------------------------------------------------------------
    @property
    def training_flops(self) -> int:
        """Training FLOPs of the closed steps (live total)."""
        return self.rollup.training_flops

    @property
    def hardware_flops(self) -> int:
        return self.rollup.hardware_flops

    def job_training_flops(self) -> int:
        """The job's training FLOPs (all ranks) of the closed steps: the budget guard's total from
        its check at the last step, else one all-reduce (every rank must call it, as a collective)."""
        if self.budget is not None:
            return self.budget.last_total
        return job_training_flops(self)

    def global_totals(self, group=None) -> dict:
        """Job-wide totals over every rank's closed steps: training_flops, hardware_flops, tokens,
        samples, steps, collective_calls, collective_bytes (sums) and ranks (how many took part).

        One all-reduce of a few int64s; every rank of ``group`` (default: the world) must call it
        at the same point, as with any collective. Outside torch.distributed it returns this
        process's totals. ``sync_every=N`` calls it after every N-th step and keeps the result in
        ``job_totals``. Its own all-reduce is not booked as the job's communication."""
        from .distributed import all_reduce_totals, local_totals

        with self._unmetered():
            self.job_totals = all_reduce_totals(local_totals(self.rollup), group)
        return self.job_totals

    @contextlib.contextmanager
    def _unmetered(self):
        """The meter's own work (its all-reduce) is not the job's: neither backend records it."""
        with self.capture.suspend() if self._active else contextlib.nullcontext():
            # RecordFunction observers (the native backend's, other meters') are off in this thread;
            # the native capture key's fallback records nothing while they are off either.
            torch._C._autograd._enable_record_function(False)
            try:
                yield
            finally:
                torch._C._autograd._enable_record_function(True)

    def summary(self) -> dict:
        """Totals over the closed steps (the open step is included once it closes)."""
        last = self.last_step  # its training phases: the built-in ones and those declared by then
        summary = summarize_batches(*self.rollup.take(), totals=self.rollup.totals, module_depth=self.module_depth,
                                    training_phases=last.training_phases if last is not None else (),
                                    ranks={self.rank}, world_size=self.world_size, where="of the live meter")
        summary.update(run_id=self.run_id, backend=self.backend, base_model=self.base_model, rank=self.rank,
                       module_depth=self.module_depth, torch_version=torch.__version__,
                       meter_errors=self.guard.summary() if hasattr(self, "guard") else {})
        from .compliance import add_method_and_compliance

        return add_method_and_compliance(summary, base_model=self.base_model, base_model_flops=self.base_model_flops)

    def open_writer(self, *, first_free: bool = False) -> TraceWriter | None:
        """The trace writer of ``out`` (None without it), opened with this rank's identity; the
        live totals' rows get the same identity. The writer may resume a trace: its run id and
        first step number become the meter's (``first_free``: see TraceWriter)."""
        writer = None
        self.rollup.identity = {"run_id": self.run_id or "run", "rank": self.rank, "world_size": self.world_size,
                                "segment": 0, **device_columns(self.energy)}
        if self.out is not None:
            identity = WriterIdentity(
                rank=self.rank, world_size=self.world_size, run_id=self.run_id, first_step=self.step_index,
                **device_columns(self.energy), energy=self.energy.describe() if self.energy is not None else None,
                backend=self.backend, base_model=self.base_model, base_model_flops=self.base_model_flops,
                module_depth=self.module_depth)
            writer = TraceWriter(self.out, identity, self.flush_every, first_free=first_free,
                                 signing_key=self.signing_key, ledger=self.ledger)
            self.run_id, self.step_index = writer.run_id, writer.first_step
            self.rollup.identity.update(run_id=writer.run_id, segment=writer.segment)
        return writer

    def _require_active(self, what: str) -> None:
        if not self._active and self._entered_in not in (None, os.getpid()):
            raise RuntimeError(f"flopcount: Meter.{what} in pid {os.getpid()}, a child forked from metered pid "
                               f"{self._entered_in}: forked children are not metered; open a meter in the child")
        if not self._active:
            raise RuntimeError(f"flopcount: Meter.{what} needs an active meter: use it inside `with meter:`")


Meter.__init__.__signature__ = init_signature()  # the options as MeterConfig lists them


_BOOKED = ("flops", "calls", "uncounted", "collectives", "collective_bytes")  # what a StepAccumulator holds


@dataclass(frozen=True)
class _Derived:
    """What ``Meter._close_step`` derived from a step's accumulator ``acc``, for the next step to
    reuse when it books the same: ``booked``, copies of what ``acc`` held (_BOOKED), its settled
    ``flops`` and ``calls`` (its record's, and those of the records that repeat it), its dark
    modules, training phases and trace rows. The trace rows never read the records' dicts again."""

    acc: StepAccumulator
    booked: tuple[dict, ...]
    flops: dict
    calls: dict
    dark_modules: dict
    training_phases: frozenset
    rows: StepRows

    def booked_by(self, acc: StepAccumulator) -> bool:
        """Whether ``acc`` holds what this step held, in the same order: the same uncounted and
        communication counts, and FLOPs and calls booked the same way (the native backend's
        reused totals: nothing to read) or found equal (C speed)."""
        flops, calls, *counts = self.booked
        if not all(same_in_order(getattr(acc, name), held) for name, held in zip(_BOOKED[2:], counts)):
            return False
        return acc.same_recipe(self.acc) or (same_in_order(acc.flops, flops) and same_in_order(acc.calls, calls))


def _copies(acc: StepAccumulator) -> tuple[dict, ...]:
    return tuple(dict(getattr(acc, name)) for name in _BOOKED)


def _settled(flops: dict, calls: dict) -> tuple[dict, dict]:
    """A closed step's FLOPs and calls with its provisional no-grad work settled (settle_phase)."""
    if PROVISIONAL_NO_GRAD not in set(map(itemgetter(0), flops)) and \
            PROVISIONAL_NO_GRAD not in set(map(itemgetter(1), calls)):
        return dict(flops), dict(calls)  # nothing to settle (the phases found at C speed): copies
    backward = any(f for (phase, _, _, _), f in flops.items() if phase == BACKWARD)
    settled_flops: dict = {}
    for (phase, category, module, op), f in flops.items():
        key = (settle_phase(phase, backward), category, module, op)
        settled_flops[key] = settled_flops.get(key, 0) + f
    settled_calls: dict = {}
    for (op, phase), n in calls.items():
        key = (op, settle_phase(phase, backward))
        settled_calls[key] = settled_calls.get(key, 0) + n
    return settled_flops, settled_calls


def _as_int(value, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.item()
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise BadInput(f"flopcount: {what}={value!r} is not a whole number") from None
    if as_int != value or as_int < 0:
        raise BadInput(f"flopcount: {what}={value!r} must be a non-negative whole number")
    return as_int


def meter(out=None, **options) -> Meter:
    """Create a Meter (a context manager). See ``Meter`` for the options."""
    return Meter(out, **options)
