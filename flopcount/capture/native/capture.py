"""The native capture backend: a C++ capture (csrc/) with no Python per op.

It sees each op at the dispatcher in one of two ways (``capture_by_key``): by default through a
dispatch key included in the meter's thread (a boxed fallback; the cheaper one), or through a
RecordFunction observer. Both hand each op to the same C++ code. The key is not used where
Dynamo has compiled code without it (``dynamo_has_compiled``): compiled code guards on the
thread's dispatch keys, and would recompile.

The extension aggregates one compact key per distinct call (op, argument shapes and scalars,
output shapes, the context id, grad mode, whether autograd's backward is running and the
backward module). The registry's rules stay here: the extension only learns each op's class
(``classify``, from ``REGISTRY.lookup``) the first time it sees the op, at the next context change
or drain (STATUS_NEW_OPS; until then it keeps everything any formula could read). When a step
closes, NativeCapture evaluates the one Python formula registry
once per distinct key (``Formula.works``, on the key decoded by decode.py) and books the result
through the Counter, so both backends share every rule: the phase and module rules are
``context.resolve_phase`` and ``context.resolve_module``, fed with the Python-held state that
``Context`` pushes to C++ on each change (module entered or left, optimizer step, user phase,
autograd.Function.apply); a module call pushes it and places its gradient hook in one call
(``module_changed``).

Booking a step costs little once steps repeat: each key's booking is kept, the extension hands
over the calls of already-booked keys apart (``set_planned``), and their summed totals are
reused whole while they repeat (``_book``); only new keys (AdamW's changing scalars, new shapes)
are evaluated and summed one by one.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

from ...accounting import StepAccumulator
from ...conventions import ROOT_MODULE
from ...distributed import collective_entry
from ...errors import BadInput, NativeUnavailable
from ...formulas import KNOWN_ZERO, REGISTRY
from ...formulas.registry import op_name
from ..active import MODEL_PHASES
from ..context import Context, resolve_module, resolve_phase
from .. import native as package  # the package's one cached loader (load, load_error), read at use
from .decode import Decoder, args_kwargs, canonical_arguments, check_key_version, dtype_codes, overload_of, python_name, tags

REPEATED_KEPT = 4  # recent booked-key totals reused whole (NativeCapture._book)
CAPTURE_ENV = "FLOPCOUNT_NATIVE_CAPTURE"  # "key" (the default) or "recordfunction"
CAPTURES = ("key", "recordfunction")


def capture_by_key() -> bool:
    """Whether new native meters capture through the dispatch key (FLOPCOUNT_NATIVE_CAPTURE);
    BadInput, with one line, for a value that is neither capture."""
    text = os.environ.get(CAPTURE_ENV, "").strip().lower() or "key"
    if text not in CAPTURES:
        raise BadInput(f"flopcount: {CAPTURE_ENV}={os.environ[CAPTURE_ENV]!r} is not a capture; "
                       f"set it to 'key' (the default) or 'recordfunction'")
    return text == "key"


def dynamo_has_compiled() -> bool:
    """Whether Dynamo has compiled a frame in this process since its last reset. Its guards hold
    the thread's dispatch keys at compile time: code compiled without the capture key recompiles
    under a key meter, and code compiled with it recompiles once the key is gone."""
    convert_frame = sys.modules.get("torch._dynamo.convert_frame")
    return convert_frame is not None and getattr(convert_frame, "FRAME_COUNTER", 1) > 0


def classify(lib, op, entry):
    """How the extension's observer treats an op (its enum ``Klass``), from the registry's entry
    for it (``REGISTRY.lookup(op)[1]``): the one place where that is decided."""
    klass = lib.Klass
    if entry is None:
        return klass.UNCOUNTED
    if entry is KNOWN_ZERO:  # the observer records only communication among known-zero ops
        return klass.COLLECTIVE if collective_entry(op) is not None else klass.ZERO
    if entry.needs_values:
        return klass.FORMULA_VALUES
    return klass.FORMULA if entry.reads_scalars else klass.FORMULA_SHAPES  # see Formula.reads_scalars


class NativeCapture:
    """The Capture backend (capture/protocol.py) that turns the observer on and books what it aggregated.

    ``step_boundary`` is the Meter's step clock (Meter._step_boundary): it closes the step that
    ``optimizer.step()`` ended, with what is booked so far. The extension marks where that step
    ends (the first op with a formula after the optimizer step), Python learns of the mark at the
    next context change (a module call), and ``flush`` books the parts on either side of the
    mark, calling ``step_boundary`` between them: the clock never flushes, so nothing re-enters."""

    def __init__(self, counter, context, step_boundary, lib=None) -> None:
        self.lib = lib or package.load()
        if self.lib is None:
            raise NativeUnavailable(f"flopcount: backend='native' is not available here: {package.load_error()}; "
                                    f"use backend='dispatch' or 'auto'")
        self.by_key = capture_by_key()  # a bad value is an error before the meter starts
        check_key_version(self.lib)  # never misread another layout's keys
        self.tags = tags(self.lib)
        self.counter = counter
        self.context = context
        self.step_boundary = step_boundary
        self.snapshot_ids: dict[tuple, int] = {}
        self.snapshots: list[tuple] = []
        self.module_ids: dict[str, int] = {}
        self.module_names: list[str] = []
        self.ops: list[tuple] = []  # by op id: (display name, OpOverload or None, registry entry), as classified
        self.keys: dict[int, tuple] = {}  # key id -> key (the extension sends each key once)
        self.bookings: dict[int, tuple] = {}  # key id -> what it books (see _booking)
        # (op id, arguments part of a key) -> works: keys that differ only in phase or module
        # (the same layer shapes in every block, forward and recompute) evaluate their formula once.
        self.works_by_arguments: dict[tuple, object] = {}
        # Recent drains' calls of already-booked keys with their totals, newest first (_book); a
        # drain holds a step's end and the next step's first ops: parts that alternate.
        self.repeated: list[tuple[dict, tuple]] = []
        self.strings: list[str] = []
        self.dtypes = dtype_codes(self.lib)
        # The bits set_context / module_call return (csrc: kViolation, kBoundary, kPythonHooks).
        self.violation, self.boundary = self.lib.STATUS_VIOLATION, self.lib.STATUS_BOUNDARY
        self.python_hooks, self.new_ops = self.lib.STATUS_PYTHON_HOOKS, self.lib.STATUS_NEW_OPS
        self.act_on = self.violation | self.boundary | self.new_ops
        self.module_call = self.lib.module_call  # bound once: called at every module call
        self.registry_version = -1
        self.slot = None  # the extension's per-meter state, while entered
        # suspend() is the one writer of the slot's pause flag: nested blocks (a flush inside a
        # compiled region, the meter's all-reduce inside a flush) resume when the outermost ends.
        self.pauses = 0
        self.pause_lock = threading.Lock()
        # One flush at a time: a module call on another thread may ask for one while this one books.
        self.flush_lock = threading.RLock()
        self.python_backward = None  # the Context's own BackwardModules, while ours replace them

    # ---- enter / exit -------------------------------------------------------------------------
    def __enter__(self) -> "NativeCapture":
        # The key where no compiled code could see it change; a thread that keeps it since Dynamo
        # compiled with it goes on with it.
        by_key = self.by_key and (not dynamo_has_compiled() or self.lib.key_included_here())
        self.slot = self.lib.enable(bool(self.counter.strict), by_key)
        self._registry_changed()
        for ident, name in enumerate(self.module_names):  # the slot starts without names
            self.lib.set_module_name(self.slot, ident, name, name == ROOT_MODULE)
        self.context.listener = self
        self.python_backward, self.context.backward = self.context.backward, _BackwardModules(self)
        self.context_changed()
        fast_path = getattr(self.lib, "ModuleFastPath", None)
        if self.context.track_modules and fast_path is not None:  # module hooks without Python
            self.context.use_fast_path(fast_path(self.context, self, MODEL_PHASES, REGISTRY,
                                                 Context._module_pre, Context._module_post))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop_observing()
        try:
            self.flush(raise_strict=exc_type is None)
        finally:
            self._release()
        return False

    def discard(self) -> None:
        """Stop seeing ops; what the extension aggregated since the last flush is dropped."""
        self._stop_observing()
        self._release()

    def _stop_observing(self) -> None:
        self.lib.disable(self.slot, dynamo_has_compiled())  # compiled code may hold the key: keep it
        self.lib.clear_backward_modules(self.slot)  # and the hooks it placed on leaf tensors
        self.context.use_fast_path(None)
        self.context.listener = None
        self.context.backward = self.python_backward

    def _release(self) -> None:
        self.lib.release(self.slot)
        self.slot = None  # flush() is a no-op from now on

    @contextlib.contextmanager
    def suspend(self):
        """The observer records nothing inside the block, on any thread (the slot is paused)."""
        self._pause(+1)
        try:
            yield
        finally:
            self._pause(-1)

    def _pause(self, delta: int) -> None:
        with self.pause_lock:
            self.pauses += delta
            if self.slot is not None and self.pauses == (1 if delta > 0 else 0):
                self.lib.set_paused(self.slot, self.pauses > 0)

    # ---- Context listener: mirror the Python-held state in C++ --------------------------------
    def context_changed(self) -> None:
        ident, optimizer = self._context_id()
        self._act(self.lib.set_context(self.slot, ident, optimizer))

    def module_changed(self, value, name: str, enter: bool):
        """A module call began (``enter`` False: ``value`` is its inputs, whose gradients leave
        it in backward) or ended (True: its outputs, whose first gradient enters it); ``value``
        is None under no_grad. One call into the extension sets the context and hooks the autograd
        nodes that made ``value``'s tensors (one, or several with torch's multi-grad rule); returns
        ``value`` when Python must hook it itself (Context._when_grads: leaves, subclasses, other
        containers), else None."""
        snapshot = self.context.snapshot()
        ident = self.snapshot_ids.get(snapshot)
        if ident is None or REGISTRY.version != self.registry_version:
            ident, _ = self._context_id()
        if value is None:
            status = self.module_call(self.slot, ident, snapshot[0], -1, None, enter)
        else:
            module = self.module_ids.get(name)
            if module is None:
                module = self._module_id(name)
            status = self.module_call(self.slot, ident, snapshot[0], module, value, enter)
        if status & self.act_on:
            self._act(status)
        return value if status & self.python_hooks else None

    def _context_id(self) -> tuple[int, bool]:
        """The id of the Context's current snapshot (interned), and whether the optimizer runs."""
        snapshot = self.context.snapshot()
        ident = self.snapshot_ids.get(snapshot)
        if ident is None:
            ident = self.snapshot_ids[snapshot] = len(self.snapshots)
            self.snapshots.append(snapshot)
        if REGISTRY.version != self.registry_version:  # a formula was registered meanwhile
            self._registry_changed()
        return ident, snapshot[0]

    def _act(self, status: int) -> None:
        """What the extension asks for after a context change."""
        if status & self.violation:  # strict mode: an uncounted op ran since the last change
            self.counter.uncounted(python_name(self.lib.take_violation(self.slot)), "no formula")
        if status & self.new_ops:
            # Ops seen for the first time: classify them (under the flush lock: another thread may
            # be booking). In strict mode one without a formula may have run unclassified:
            # booking now raises for it as promptly as for a known one.
            with self.flush_lock:
                unformulated = self._refresh_ops()
            if unformulated and self.counter.strict:
                self.flush()
        if status & self.boundary:  # the next step began: book the finished one, which closes it
            self.flush()

    def mark_step_end(self) -> None:
        """optimizer.step() ended a step (auto steps): the next op with a formula opens the next."""
        self.lib.mark_pending_boundary(self.slot, True)

    def _module_id(self, name: str) -> int:
        ident = self.module_ids.get(name)
        if ident is None:
            ident = self.module_ids[name] = len(self.module_names)
            self.module_names.append(name)
            self.lib.set_module_name(self.slot, ident, name, name == ROOT_MODULE)
        return ident

    def _registry_changed(self) -> None:
        """The registry is new or changed: every op is classified afresh, every booking dropped."""
        self.registry_version = REGISTRY.version
        self.ops.clear()
        self.bookings.clear()
        self.repeated = []
        if self.slot is not None:
            self.lib.set_planned(self.slot, [], False)
        self.works_by_arguments.clear()
        self._refresh_ops()

    # ---- booking --------------------------------------------------------------------------------
    def flush(self, raise_strict: bool = True) -> None:
        """Book everything the extension aggregated since the last flush; at each step end marked
        inside it, the Meter's clock closes the step (``step_boundary``, which never flushes)."""
        if self.slot is None:  # exited: the last flush booked everything
            return
        # Steps close at the marks only; tensors built to evaluate formulas are not the job's.
        with self.flush_lock, self.counter.detached(), self.suspend():
            generations, new_keys, values, reset = self.lib.drain(self.slot)
            if reset:  # the extension forgot its key ids (too many distinct keys): so do we
                used = {key_id for repeated, calls, _ in generations for key_id in (*repeated, *calls)}
                self.keys = {k: v for k, v in self.keys.items() if k in used}
                self.bookings.clear()
                self.repeated = []
                self.works_by_arguments.clear()
            self.keys.update(new_keys)
            stale = reset
            if self.registry_version != REGISTRY.version:
                self._registry_changed()
                stale = True
            if stale:  # the plans were dropped: every key is booked afresh
                generations = [({}, {**repeated, **calls}, uncounted) for repeated, calls, uncounted in generations]
            self._refresh_ops()
            for i, (repeated, calls, uncounted) in enumerate(generations):
                if i:
                    self.step_boundary()
                self._book(repeated, calls, uncounted, values, raise_strict)

    def _refresh_ops(self) -> bool:
        """Classify the ops the extension has seen since the last call (REGISTRY.lookup) and push
        their classes; True when one of them has no formula."""
        start = len(self.ops)
        classes, uncounted = [], False
        for name, overload in self.lib.op_names(start):
            op = overload_of(name, overload)
            entry = REGISTRY.lookup(op)[1] if op is not None else None
            self.ops.append((op_name(op) if op is not None else python_name(name), op, entry))
            classes.append(int(classify(self.lib, op, entry)))
            uncounted = uncounted or entry is None
        if classes:
            self.lib.set_op_classes(start, classes)
        self.strings.extend(self.lib.strings(len(self.strings)))
        return uncounted

    def _book(self, repeated, calls, uncounted, values, raise_strict: bool) -> None:
        """Book one generation: ``repeated`` holds the calls of keys booked before with a plan
        (the extension tells them apart, see ``set_planned``), ``calls`` those of the other keys."""
        counter = self.counter
        # Uncounted calls are reported once everything else is booked (strict mode raises there).
        lost = [(self.ops[op_id][0], "no formula", count) for op_id, count in uncounted.items()]
        bookings = self.bookings
        booked = []  # (accumulator entries, calls key, calls): see StepAccumulator.add_repeated
        planned = []  # key ids booked with a plan for the first time
        for key_id, count in calls.items():
            booking = bookings.get(key_id)
            if booking is None:
                try:
                    booking = self._booking(key_id, values)
                except Exception as exc:  # as Counter.book: recorded, the calls listed as uncounted
                    counter.guard.failed("booking", exc)
                    self._lost(key_id, count)
                    continue
                if booking[3] is not None and key_id in bookings:
                    planned.append(key_id)
            name, entry, works, plan = booking
            if plan is not None:
                booked.append((*plan, count))
            elif works is None:  # a known-zero op recorded before the extension knew its class
                continue
            elif isinstance(works, str):  # no formula, or the formula failed
                lost.append((name, works, count))
            else:  # communication: calls and payload bytes
                for _ in range(count):
                    counter.acc.add_collective(name, works)
        if repeated:
            # Steps of a training loop repeat the same keys with the same calls (what changes, such as
            # AdamW's scalars, makes new keys): their totals are summed once and then reused whole.
            # (A steady drain hands over the very dict it handed before: found by identity.)
            totals = next((t for calls_seen, t in self.repeated if calls_seen is repeated), None) or \
                next((t for calls_seen, t in self.repeated if calls_seen == repeated), None)
            if totals is None:
                totals = self._totals(repeated)
                self.repeated = [(repeated, totals), *self.repeated[:REPEATED_KEPT - 1]]
            counter.acc.add_totals(*totals)
        counter.acc.add_repeated(booked)
        if planned:
            self.lib.set_planned(self.slot, planned, True)
        for name, why, count in lost:
            self._uncounted(name, why, count, raise_strict)

    def _totals(self, repeated: dict) -> tuple[dict, dict]:
        """(FLOPs by accumulator key, calls by (op, phase)) of keys with plans, ``repeated``: key id -> calls."""
        acc, bookings = StepAccumulator(), self.bookings
        acc.add_repeated([(*bookings[key_id][3], count) for key_id, count in repeated.items()])
        return dict(acc.flops), dict(acc.calls)

    def _booking(self, key_id: int, values) -> tuple:
        """(op name, registry entry, works, plan) for a key, evaluated once: formulas are pure and
        the key holds everything they read, so later steps reuse it (steps of a training loop
        repeat the same keys). ``plan``: the accumulator's (phase, category, module, op) keys and
        FLOPs per call, and its (op, phase) calls key; None for communication and failed
        formulas. ``works`` None: a known-zero op that is not communication (it books nothing).
        Keys holding device values reference this drain's copies: not kept."""
        key = self.keys[key_id]
        op_id, snapshot_id, flags, backward_module = key[:4]
        name, op, entry = self.ops[op_id]
        if entry is KNOWN_ZERO and collective_entry(op) is None:
            booking = self.bookings[key_id] = (name, entry, None, None)
            return booking
        optimizer, user_phase, outer_grad, forward_module = self.snapshots[snapshot_id]
        in_backward = bool(flags & 2)
        phase = resolve_phase(optimizer, in_backward, bool(flags & 1), user_phase, outer_grad)
        module = resolve_module(in_backward, forward_module,
                                self.module_names[backward_module] if backward_module >= 0 else None)
        needs_values = getattr(entry, "needs_values", False)
        if needs_values:  # the key may reference this drain's values
            works = self._works(key, op, entry, values)
        else:
            arguments = (op_id, canonical_arguments(key, self.tags, keep_dtype=entry is KNOWN_ZERO,
                                                    keep_scalars=getattr(entry, "reads_scalars", True)))
            works = self.works_by_arguments.get(arguments)
            if works is None:
                works = self.works_by_arguments[arguments] = self._works(key, op, entry, values)
        plan = None
        if entry is not KNOWN_ZERO and not isinstance(works, str):
            plan = (tuple(((p or phase, c, module, name), f) for c, f, p in works), (name, phase))
        booking = (name, entry, works, plan)
        if values and needs_values:  # a key of this drain only
            del self.keys[key_id]
        else:
            self.bookings[key_id] = booking
        return booking

    def _works(self, key, op, entry, values):
        """Work items for one distinct key (Formula.works), payload bytes for a communication op,
        or a string saying why the formula failed."""
        decoder = Decoder(key, self.strings, self.dtypes, values,
                          as_tensors=entry is KNOWN_ZERO or getattr(entry, "needs_values", False), tags=self.tags)
        inputs, outputs = decoder.decode()
        args, kwargs = args_kwargs(op, inputs)
        out = outputs[0] if len(outputs) == 1 else (tuple(outputs) if outputs else None)
        if entry is None:  # no formula (the extension recorded it before knowing, or the registry changed)
            return "no formula"
        if entry is KNOWN_ZERO:  # communication (the extension records no other known-zero op)
            collective = collective_entry(op)
            return collective[1].payload_bytes(args, kwargs, out) if collective else 0
        try:
            return entry.works(args, kwargs, out)
        except Exception as exc:  # a formula must never break training; report the op instead
            return f"formula failed: {type(exc).__name__}: {exc}"

    def _lost(self, key_id: int, count: int) -> None:
        """Calls of a key whose booking failed: uncounted, under the op's name when it is known."""
        key = self.keys.get(key_id)
        name = self.ops[key[0]][0] if key and key[0] < len(self.ops) else "<native key>"
        with self.counter.acc.lock:
            self.counter.acc.uncounted[name] += count

    def _uncounted(self, name: str, why: str, count: int, raise_strict: bool) -> None:
        counter = self.counter
        if counter.strict and not raise_strict:  # an exception is already on its way out
            with counter.acc.lock:
                counter.acc.uncounted[name] += count
            return
        counter.uncounted(name, why)
        if count > 1:
            with counter.acc.lock:
                counter.acc.uncounted[name] += count - 1


class _BackwardModules:
    """Context.backward while the native backend is active: the same stacks (BackwardModules),
    kept in the extension, so the gradient hooks run no Python and the observer reads the
    innermost module itself."""

    def __init__(self, capture: NativeCapture) -> None:
        self.lib, self.slot, self.module_id = capture.lib, capture.slot, capture._module_id
        self.module_names = capture.module_names

    def hook(self, tensor, name: str, enter: bool) -> bool:
        return self.lib.add_module_hook(self.slot, tensor, self.module_id(name), enter)

    def enter(self, name: str) -> None:
        self.lib.backward_event(self.slot, self.module_id(name), True)

    def leave(self, name: str) -> None:
        self.lib.backward_event(self.slot, self.module_id(name), False)

    def innermost(self, task: int) -> str | None:
        module = self.lib.backward_module(self.slot, task)
        return self.module_names[module] if module >= 0 else None

    def clear(self) -> None:
        self.lib.clear_backward_modules(self.slot)
