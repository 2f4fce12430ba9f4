"""The booking step shared by every capture path: op -> registry -> formula -> accumulator."""
from __future__ import annotations

import contextlib
import warnings

from ..conventions import OPTIMIZER
from ..formulas import KNOWN_ZERO, REGISTRY
from ..accounting import StepAccumulator
from ..distributed import Collective, collective_entry
from ..errors import UncountedOpError  # noqa: F401  (also imported from here)


class Counter:
    """Books ops into the open step. ``context`` answers phase and module for the current op."""

    def __init__(self, context, *, strict: bool = False, warn: bool = True, on_work=None) -> None:
        self.context = context
        self.strict = strict
        self.warn = warn
        # The Meter's step clock (Meter._step_boundary): called before booking non-zero,
        # non-optimizer work, so that a step optimizer.step() ended closes before the next one's work.
        self.on_work = on_work
        self.acc = StepAccumulator()
        self.warned: set[str] = set()
        self.collective_ops: dict = {}  # op -> (name, Collective) or None, for known-zero ops

    @property
    def guard(self):
        return self.context.guard

    # ---- where bookings go: only these methods change it ------------------------------------
    def take_step(self) -> StepAccumulator:
        """The open step's accumulator, handed to the Meter closing it; bookings go to a new one."""
        acc, self.acc = self.acc, StepAccumulator()
        return acc

    @contextlib.contextmanager
    def redirect(self, sink: StepAccumulator):
        """Bookings inside the block go to ``sink`` instead of the open step, and close no step
        (a CUDA graph's capture records into its tally; the budget's all-reduce is booked nowhere)."""
        acc, on_work = self.acc, self.on_work
        self.acc, self.on_work = sink, None
        try:
            yield sink
        finally:
            self.acc, self.on_work = acc, on_work

    @contextlib.contextmanager
    def detached(self):
        """Bookings inside the block go to the open step but never tell the step clock: the
        native backend's flush books batches and reports the step ends it holds itself."""
        on_work, self.on_work = self.on_work, None
        try:
            yield
        finally:
            self.on_work = on_work

    def before(self, func):
        """Entry for an op about to run, or None when nothing is to be computed for it."""
        try:
            name, entry = REGISTRY.lookup(func)
        except Exception as exc:  # never into the op's caller: the op is then uncounted
            self.guard.failed("booking", exc)
            self.uncounted(str(getattr(func, "__name__", func)), "registry lookup failed")
            return None
        if entry is KNOWN_ZERO:
            # Communication is known-zero in FLOPs; its calls and bytes are booked separately.
            collective = self.collective_ops.get(func, False)
            if collective is False:
                collective = self.collective_ops[func] = collective_entry(func)
            return collective
        if entry is None:
            self.uncounted(name, "no formula")
            return None
        return name, entry

    def count(self, entry, args, kwargs, out) -> None:
        name, formula = entry
        if formula.__class__ is Collective:
            try:
                self.acc.add_collective(name, formula.payload_bytes(args, kwargs, out))
            except Exception as exc:
                self.guard.failed("booking", exc)
            return
        try:
            works = formula.works(args, kwargs, out)
        except Exception as exc:  # a formula must never break training; report the op instead
            self.uncounted(name, f"formula failed: {type(exc).__name__}: {exc}")
            return
        self.book(name, works)

    def book(self, name: str, works, phase: str | None = None, module: str | None = None) -> None:
        """Book one call's work items; a failure (a malformed formula result, a step that could
        not close) is recorded and the op listed as uncounted, never raised into the op's caller."""
        try:
            if phase is None or module is None:
                here_phase, here_module = self.context.where()
                phase, module = phase or here_phase, module or here_module
            if self.on_work is not None and phase != OPTIMIZER and any(w.flops for w in works):
                self.on_work()
            self.acc.add(phase, module, name, works)
        except Exception as exc:
            self.guard.failed("booking", exc)
            self.acc.add_uncounted(name)

    def book_totals(self, flops: dict, calls: dict) -> None:
        """Book many calls' summed totals (FLOPs by (phase, category, module, op), calls by (op,
        phase)), as ``book`` books one call: a CUDA graph's replay of the native backend's
        reused totals. A failure is recorded, never raised into the caller."""
        try:
            if self.on_work is not None and any(f for (phase, _, _, _), f in flops.items() if phase != OPTIMIZER):
                self.on_work()
            self.acc.add_totals(dict(flops), dict(calls))
        except Exception as exc:
            self.guard.failed("booking", exc)

    def uncounted(self, name: str, why: str) -> None:
        if self.strict:
            raise UncountedOpError(
                f"flopcount: {name} is uncounted ({why}); give it a formula with "
                f"flopcount.register_formula(...) or run without strict=True")
        self.acc.add_uncounted(name)
        if self.warn and name not in self.warned:
            self.warned.add(name)
            warnings.warn(f"flopcount: {name} is uncounted ({why}); it is listed in uncounted_ops",
                          stacklevel=3)
