"""The native capture backend: a C++ RecordFunction observer (csrc/) with no Python per op.

The extension aggregates one compact key per distinct call (op, argument shapes and scalars,
output shapes, the context id, grad mode, whether autograd's backward is running and the
backward module). When a step closes, this module evaluates the one Python formula registry
once per distinct key (``Formula.works``) and books the result through the Counter, so both
backends share every rule: the phase and module rules are ``context.resolve_phase`` and
``context.resolve_module``, fed with the Python-held state that ``Context`` pushes to C++ on
each change (module entered or left, optimizer step, user phase, autograd.Function.apply).

Build: the extension is compiled against the installed torch into a cache keyed by everything
that changes the binary (native_build.py), in a private directory renamed into place; a process
waits for a build at most FLOPCOUNT_NATIVE_WAIT seconds (default 10), then goes on without it.
``flopcount build-native`` builds it ahead of time. Set FLOPCOUNT_NATIVE=0 to never build or load it.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

from ..conventions import ROOT_MODULE
from ..distributed import COLLECTIVE_NAMESPACES, NOT_COMMUNICATION, collective_entry
from ..formulas import KNOWN_ZERO, REGISTRY
from ..formulas.registry import op_name
from . import native_build
from .context import resolve_module, resolve_phase
from .native_build import BUILD_FLAGS, EXTENSION  # noqa: F401 (the names callers use)

SOURCE_NAME = "flopcount_native.cpp"
MIN_TORCH = (2, 7)  # RecordFunction::overload_name; older torch uses the dispatch backend

# Key tags, as in csrc/flopcount_native.cpp.
(NONE, TENSOR, INT, DOUBLE, BOOL, STRING, INT_LIST, DOUBLE_LIST, BOOL_LIST, LIST, DTYPE, OPAQUE,
 VALUES, PENDING_VALUES, TENSOR_DTYPE) = range(15)
OUTPUTS = -1
# Registry classes, as in the extension.
ZERO, FORMULA, UNCOUNTED, FORMULA_VALUES, COLLECTIVE = range(5)


# ---- build and load (native_build.py does the building) ------------------------------------------

def source_path() -> Path | None:
    """The C++ source: csrc/ of a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc" / SOURCE_NAME, here.parent / "csrc" / SOURCE_NAME):
        if candidate.is_file():
            return candidate
    return None


def cache_dir(source: Path) -> Path:
    """This environment's build directory (native_build.BuildPaths: keyed by torch installation,
    compiler, flags, source and Python ABI)."""
    return native_build.paths_for(source).final


def _unsupported() -> str | None:
    """Why the extension is never built here (disabled, torch too old, no source), else None."""
    if os.environ.get("FLOPCOUNT_NATIVE", "").strip() == "0":
        return "disabled by FLOPCOUNT_NATIVE=0"
    if TorchVersion(torch.__version__) < MIN_TORCH:
        return (f"it needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                f"(RecordFunction::overload_name); this is torch {torch.__version__}")
    if source_path() is None:
        return f"the C++ source {SOURCE_NAME} is not installed"
    return None


@functools.lru_cache(maxsize=1)
def _load():
    """(extension module, None) or (None, why it is not available). Once per process; waits for a
    build at most FLOPCOUNT_NATIVE_WAIT seconds (a background build goes on for later processes)."""
    why = _unsupported()
    if why is not None:
        return None, why
    try:
        return native_build.load(source_path(), native_build.wait_bound())
    except Exception as exc:  # an unreadable cache dir, a bad FLOPCOUNT_NATIVE_WAIT, ...
        return None, f"the native extension is not available: {native_build._one_line(exc)}"


def load():
    """The extension module, or None when it is not available (yet) here."""
    return _load()[0]


def load_error() -> str | None:
    """None when the extension loads, else one line saying why not."""
    return _load()[1]


def build_state() -> dict:
    """{"state", "detail", "build_dir"} without building (native_build.state); state is one of
    built, building, failed, not built, disabled (or unsupported: detail says why)."""
    why = _unsupported()
    if why is not None:
        state = "disabled" if why.startswith("disabled") else "unsupported"
        return {"state": state, "detail": why if state == "unsupported" else "disabled (FLOPCOUNT_NATIVE=0)",
                "build_dir": None}
    try:
        return native_build.state(source_path())
    except Exception as exc:
        return {"state": "unsupported", "detail": native_build._one_line(exc), "build_dir": None}


def describe() -> dict:
    """Versions, the backend that backend='auto' picks, and the extension's build state
    (``flopcount info``). Loads a built extension; never starts or waits for a build."""
    import platform

    from .. import __version__

    source = source_path()
    state = build_state()
    module, error = _load() if state["state"] in ("built", "disabled", "unsupported") else (None, state["detail"])
    if state["state"] == "built" and module is None:
        state = {**state, "state": "failed", "detail": f"failed: {error}"}
    return {
        "flopcount": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "active_backend": "native" if module is not None else "dispatch",
        "native_extension": "built" if module is not None else state["detail"],
        "native_state": state["state"],
        "native_error": error if state["state"] in ("failed", "unsupported") else None,
        "native_source": str(source) if source else None,
        "native_build_dir": state["build_dir"],
        "native_module": str(native_build.paths_for(source).library) if module is not None and source else None,
    }


def build() -> int:
    """Build the extension now, waiting for a build another process runs (``flopcount build-native``,
    ``make setup``); 0 when it loads, 1 otherwise."""
    why = _unsupported()
    if why is None:
        source = source_path()
        try:
            paths = native_build.paths_for(source)
            if not paths.library.is_file():
                if native_build.holder(paths) is not None:
                    print(f"flopcount: waiting for the build {native_build.building_line(paths)}", file=sys.stderr)
                else:
                    print(f"flopcount: building the native extension into {paths.final} (about a minute)",
                          file=sys.stderr)
            why = native_build.build(source, paths)
        except Exception as exc:  # an unwritable cache dir, ...
            why = native_build._one_line(exc)
        _load.cache_clear()
        why = why or load_error()
    if why:
        print(f"flopcount: native backend unavailable ({why}); the dispatch backend will be used",
              file=sys.stderr)
        return 1
    # The library is loaded from its private build dir before that is renamed into place: name
    # where it lives now, not the module's (stale) __file__.
    print(f"flopcount: native extension ready: {native_build.paths_for(source_path()).library}")
    return 0


# ---- the capture backend ---------------------------------------------------------------------------

class NativeCapture:
    """Context manager that turns the observer on and books what it aggregated.

    ``close_pending`` (Meter._on_work) closes the step that ``optimizer.step()`` ended; the
    extension marks where that happens (the first op with a formula after the optimizer step),
    Python learns of the mark at the next context change (a module call), and ``flush`` books
    the parts on either side of the mark into their own steps."""

    def __init__(self, counter, context, close_pending, lib=None) -> None:
        self.lib = lib or load()
        if self.lib is None:
            raise RuntimeError(f"flopcount: backend='native' is not available here: {load_error()}; "
                               f"use backend='dispatch' or 'auto'")
        self.counter = counter
        self.context = context
        self.close_pending = close_pending
        self.snapshot_ids: dict[tuple, int] = {}
        self.snapshots: list[tuple] = []
        self.module_ids: dict[str, int] = {}
        self.module_names: list[str] = []
        self.ops: list[tuple] = []  # by op id: (display name, OpOverload or None, registry entry)
        self.keys: dict[int, tuple] = {}  # key id -> key (the extension sends each key once)
        self.bookings: dict[int, tuple] = {}  # key id -> what it books (see _booking)
        # (op id, arguments part of a key) -> works: keys that differ only in phase or module
        # (the same layer shapes in every block, forward and recompute) evaluate their formula once.
        self.works_by_arguments: dict[tuple, object] = {}
        self.strings: list[str] = []
        self.dtypes = _dtype_codes(self.lib)
        self.registry_version = -1
        self.flushing = False
        self.slot = None  # the extension's per-meter state, while entered
        self.python_backward = None  # the Context's own BackwardModules, while ours replace them

    # ---- enter / exit -------------------------------------------------------------------------
    def __enter__(self) -> "NativeCapture":
        self._push_registry()
        self.slot = self.lib.enable(bool(self.counter.strict))
        for ident, name in enumerate(self.module_names):  # the slot starts without names
            self.lib.set_module_name(self.slot, ident, name, name == ROOT_MODULE)
        self.context.listener = self
        self.python_backward, self.context.backward = self.context.backward, _BackwardModules(self)
        self.context_changed()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.lib.disable(self.slot)
        self.context.listener = None
        self.context.backward = self.python_backward
        try:
            self.flush(raise_strict=exc_type is None)
        finally:
            self.lib.release(self.slot)
        return False

    # ---- Context listener: mirror the Python-held state in C++ --------------------------------
    def context_changed(self) -> None:
        snapshot = self.context.snapshot()
        ident = self.snapshot_ids.get(snapshot)
        if ident is None:
            ident = self.snapshot_ids[snapshot] = len(self.snapshots)
            self.snapshots.append(snapshot)
        if REGISTRY.version != self.registry_version:  # a formula was registered meanwhile
            self._push_registry()
        status = self.lib.set_context(self.slot, ident, snapshot[0])
        if status & 1:  # strict mode: an uncounted op ran since the last change
            self.counter.uncounted(_python_name(self.lib.take_violation(self.slot)), "no formula")
        if status & 2 and not self.flushing:  # the next step began: close the finished one now
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

    def _push_registry(self) -> None:
        entries = []
        for op, entry in REGISTRY.items():
            klass = ZERO if entry is KNOWN_ZERO else FORMULA_VALUES if entry.needs_values else FORMULA
            if isinstance(op, torch._ops.OpOverload):
                entries.append((op._schema.name, op._overloadname, klass))
            elif isinstance(op, torch._ops.OpOverloadPacket):
                entries.append((op._qualified_op_name, "*", klass))
            elif isinstance(op, str):  # registered by name: 'ns::op' or 'ns::op.overload'
                name, _, overload = op.partition(".")
                entries.append((name, overload or "*", klass))
        # Non-aten ops with a formula in torch's own flop registry (Registry.lookup reuses those).
        from torch.utils.flop_counter import flop_registry

        for packet in list(flop_registry):
            namespace = getattr(packet, "_qualified_op_name", "aten::").split("::")[0]
            if namespace != "aten" and namespace not in REGISTRY._zero_namespaces and packet not in REGISTRY._table:
                entries.append((packet._qualified_op_name, "*", FORMULA_VALUES))
        self.lib.set_registry(entries, sorted(REGISTRY._zero_namespaces), list(COLLECTIVE_NAMESPACES),
                              sorted(NOT_COMMUNICATION))
        self.registry_version = REGISTRY.version
        self.ops.clear()  # entries may have changed
        self.bookings.clear()
        self.works_by_arguments.clear()

    # ---- booking --------------------------------------------------------------------------------
    def flush(self, raise_strict: bool = True) -> None:
        """Book everything the extension aggregated since the last flush."""
        if self.flushing:  # close_pending closes a step, which flushes again
            return
        self.flushing = True
        on_work, self.counter.on_work = self.counter.on_work, None  # steps close at the marks only
        self.lib.set_paused(self.slot, True)  # tensors built to evaluate formulas are not the job's
        try:
            generations, new_keys, values, reset = self.lib.drain(self.slot)
            if reset:  # the extension forgot its key ids (too many distinct keys): so do we
                used = {key_id for calls, _ in generations for key_id in calls}
                self.keys = {k: v for k, v in self.keys.items() if k in used}
                self.bookings.clear()
                self.works_by_arguments.clear()
            self.keys.update(new_keys)
            if self.registry_version != REGISTRY.version:
                self._push_registry()
            self._refresh_ops()
            for i, (calls, uncounted) in enumerate(generations):
                if i:
                    self.close_pending()
                self._book(calls, uncounted, values, raise_strict)
        finally:
            self.lib.set_paused(self.slot, False)
            self.counter.on_work = on_work
            self.flushing = False

    def _refresh_ops(self) -> None:
        names = self.lib.op_names(len(self.ops))
        for name, overload in names:
            op = _overload(name, overload)
            entry = REGISTRY.lookup(op)[1] if op is not None else None
            self.ops.append((op_name(op) if op is not None else _python_name(name), op, entry))
        self.strings.extend(self.lib.strings(len(self.strings)))

    def _book(self, calls, uncounted, values, raise_strict: bool) -> None:
        counter = self.counter
        for op_id, count in uncounted.items():
            self._uncounted(self.ops[op_id][0], "no formula", count, raise_strict)
        booked = []  # (accumulator entries, calls key, calls): see StepAccumulator.add_repeated
        for key_id, count in calls.items():
            booking = self.bookings.get(key_id)
            if booking is None:
                try:
                    booking = self._booking(key_id, values)
                except Exception as exc:  # as Counter.book: recorded, the calls listed as uncounted
                    counter.guard.failed("booking", exc)
                    self._lost(key_id, count)
                    continue
            name, entry, works, plan = booking
            if plan is not None:
                booked.append((*plan, count))
            elif isinstance(works, str):  # the formula failed
                self._uncounted(name, works, count, raise_strict)
            else:  # communication: calls and payload bytes
                for _ in range(count):
                    counter.acc.add_collective(name, works)
        counter.acc.add_repeated(booked)

    def _booking(self, key_id: int, values) -> tuple:
        """(op name, registry entry, works, plan) for a key, evaluated once: formulas are pure and
        the key holds everything they read, so later steps reuse it (steps of a training loop
        repeat the same keys). ``plan``: the accumulator's (phase, category, module, op) keys and
        FLOPs per call, and its (op, phase) calls key; None for communication and failed
        formulas. Keys holding device values reference this drain's copies: not kept."""
        key = self.keys[key_id]
        op_id, snapshot_id, flags, backward_module = key[:4]
        name, op, entry = self.ops[op_id]
        optimizer, user_phase, outer_grad, forward_module = self.snapshots[snapshot_id]
        in_backward = bool(flags & 2)
        phase = resolve_phase(optimizer, in_backward, bool(flags & 1), user_phase, outer_grad)
        module = resolve_module(in_backward, forward_module,
                                self.module_names[backward_module] if backward_module >= 0 else None)
        needs_values = getattr(entry, "needs_values", False)
        if needs_values:  # the key may reference this drain's values
            works = self._works(key, op, entry, values)
        else:
            arguments = (op_id, key[4:])
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
        decoder = _Decoder(key, self.strings, self.dtypes, values,
                           as_tensors=entry is KNOWN_ZERO or getattr(entry, "needs_values", False))
        inputs, outputs = decoder.decode()
        args, kwargs = _args_kwargs(op, inputs)
        out = outputs[0] if len(outputs) == 1 else (tuple(outputs) if outputs else None)
        if entry is None:  # the registry changed since the extension classified the op
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


# ---- decoding keys ----------------------------------------------------------------------------------

class _Decoder:
    """Turns a key back into argument values: shapes in place of tensors (meta tensors, or real
    integer tensors where values were recorded, for formulas that need tensors)."""

    def __init__(self, key, strings, dtypes, values, as_tensors: bool) -> None:
        self.key, self.pos = key, 4
        self.strings, self.dtypes, self.values, self.as_tensors = strings, dtypes, values, as_tensors

    def decode(self):
        key = self.key
        inputs, outputs = [], []
        while self.pos < len(key) and key[self.pos] != OUTPUTS:
            is_default = bool(key[self.pos])
            self.pos += 1
            inputs.append((is_default, self.value()))
        self.pos += 1
        while self.pos < len(key):
            outputs.append(self.value())
        return inputs, outputs

    def take(self, n: int = 1):
        out = self.key[self.pos:self.pos + n]
        self.pos += n
        return out

    def value(self):
        (tag,) = self.take()
        if tag == TENSOR:
            return self.tensor()
        if tag in (NONE, OPAQUE):
            return None
        if tag == INT:
            return self.take()[0]
        if tag == DOUBLE:
            return _bits_to_float(self.take()[0])
        if tag == BOOL:
            return bool(self.take()[0])
        if tag == STRING:
            return self.strings[self.take()[0]]
        if tag == DTYPE:
            return self.dtypes.get(self.take()[0])
        if tag in (INT_LIST, DOUBLE_LIST, BOOL_LIST):
            items = list(self.take(self.take()[0]))
            if tag == DOUBLE_LIST:
                return [_bits_to_float(v) for v in items]
            return [bool(v) for v in items] if tag == BOOL_LIST else items
        if tag == LIST:
            return [self.value() for _ in range(self.take()[0])]
        raise ValueError(f"flopcount: corrupt native key (tag {tag})")

    def tensor(self):
        (dim,) = self.take()
        shape = tuple(self.take(dim))
        key = self.key
        data, dtype = None, torch.float32
        if self.pos < len(key) and key[self.pos] == VALUES:
            self.pos += 1
            data = list(self.take(self.take()[0]))
        elif self.pos < len(key) and key[self.pos] == PENDING_VALUES:
            self.pos += 1
            data = self.values[self.take()[0]]
        elif self.pos < len(key) and key[self.pos] == TENSOR_DTYPE:
            self.pos += 1
            dtype = self.dtypes.get(self.take()[0], torch.float32)
        if not self.as_tensors:
            return shape
        if data is not None:
            return torch.tensor(data, dtype=torch.int64).reshape(shape)
        return torch.empty(shape, dtype=dtype, device="meta")


def _bits_to_float(bits: int) -> float:
    import struct

    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _args_kwargs(op, inputs):
    """Split recorded arguments as the Python dispatcher does for __torch_dispatch__: positional
    arguments up to the last one that is not at its default, keyword-only ones not at their default."""
    if op is None:
        return tuple(v for _, v in inputs), {}
    arguments = op._schema.arguments
    n = min(len(arguments), len(inputs))
    kwarg_start = n
    while kwarg_start > 0 and arguments[kwarg_start - 1].kwarg_only:
        kwarg_start -= 1
    positional_end = kwarg_start
    while positional_end > 0 and inputs[positional_end - 1][0]:
        positional_end -= 1
    args = tuple(v for _, v in inputs[:positional_end])
    kwargs = {arguments[i].name: inputs[i][1] for i in range(kwarg_start, n) if not inputs[i][0]}
    return args, kwargs


def _overload(name: str, overload: str):
    """The OpOverload for 'ns::op' and an overload name ('' is the default overload)."""
    namespace, _, opname = name.partition("::")
    try:
        packet = getattr(getattr(torch.ops, namespace), opname)
        return getattr(packet, overload or "default")
    except (AttributeError, RuntimeError):
        return None


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


def _python_name(name: str) -> str:
    """'aten::mm.out' -> 'aten.mm' (op_name's display form: the packet)."""
    return name.split(".")[0].replace("::", ".")


@functools.lru_cache(maxsize=1)
def _dtype_table(lib) -> tuple:
    codes = {}
    with warnings.catch_warnings():  # creating quantized / complex-half tensors warns
        warnings.simplefilter("ignore")
        for value in vars(torch).values():
            if isinstance(value, torch.dtype) and value not in codes.values():
                try:
                    codes[lib.dtype_code(torch.empty(0, dtype=value))] = value
                except (RuntimeError, TypeError):  # dtypes without CPU storage
                    continue
    return tuple(codes.items())


def _dtype_codes(lib) -> dict:
    """Extension's ScalarType code -> torch.dtype."""
    return dict(_dtype_table(lib))
