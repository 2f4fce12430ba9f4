"""Dark modules: modules whose forward did work that no capture path saw (no silent zeros).

A module is *dark* in a step when
  1. it has parameters of its own (``parameters(recurse=False)``),
  2. its forward ran in the step (the process-wide module hooks saw it),
  3. no FLOPs were booked in the step for it or any of its submodules (by module name), and
  4. it is not a lookup module (an ``nn.Embedding`` / ``nn.EmbeddingBag`` subclass: indexing,
     zero FLOPs by convention);
or when its class comes from a library known to bypass the dispatcher (Transformer Engine,
mamba-ssm, causal-conv1d, apex: ``BYPASSING_PACKAGES``) and flopcount counts no API of it
(``COUNTED_CLASSES``), whatever else was booked for it: its own kernels are invisible.

Typical causes: a C++/CUDA extension called through pybind, numpy, a CUDA library call. Dark
modules are listed by name with their class in ``dark_modules`` (summary, traces, report, method
statement); strict mode raises ``UncountedOpError`` when the step closes.
"""
from __future__ import annotations

import torch

from .context import SeenModules

# Libraries whose kernels never reach the dispatcher (DESIGN.md, measured facts).
BYPASSING_PACKAGES = ("transformer_engine", "mamba_ssm", "causal_conv1d", "apex")
# Classes of those libraries that flopcount counts at their Python API, as (root package, class
# name): integrations/kernels.py adds the modules it wraps.
COUNTED_CLASSES: set[tuple[str, str]] = set()
LOOKUP_MODULES = (torch.nn.Embedding, torch.nn.EmbeddingBag)


def class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def bypassing(cls) -> bool:
    """A class of a dispatcher-bypassing library that flopcount does not count at its API."""
    root = cls.__module__.split(".", 1)[0]
    return root in BYPASSING_PACKAGES and (root, cls.__name__) not in COUNTED_CLASSES


def dark_in_step(ran: dict[str, str], always_dark: dict[str, str], flops_keys) -> dict[str, str]:
    """The rule above as a pure function. ``ran``: module name -> class name of the modules with
    own parameters whose forward ran; ``always_dark``: those of bypassing libraries;
    ``flops_keys``: the step's (phase, category, module, op) keys with FLOPs."""
    lit: set[str] = set()
    for module in {key[2] for key in flops_keys}:  # a step has many keys per module
        parts = module.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in lit:
                break
            lit.add(prefix)
    dark = {name: cls for name, cls in ran.items() if name not in lit}
    dark.update(always_dark)
    return dict(sorted(dark.items()))


class DarkModuleWatch:
    """The meter's Context's module watch (``Context.module_watch``: run after the Context in
    each module call's pre hook): records the modules with own parameters whose forward ran, by
    the name the Context gave this call (the frame it just pushed: a module reused under several
    outermost modules has a name in each, capture/context.py ModuleNames). One dict lookup per
    module call. With the native backend, csrc/hooks.cpp's ModuleFastPath does ``_module_pre``'s
    common case on the same state (``kinds``, ``_Kind``'s slots, ``ran``, ``always_dark``), and
    calls it for the rest."""

    def __init__(self, context) -> None:
        self.context = context
        self.stack = context.forward_stack  # a list the Context never rebinds: this call's frame is last
        self.kinds = SeenModules()  # module -> _Kind, found in one dict lookup per module call
        self.ran: dict[str, str] = {}
        self.always_dark: dict[str, str] = {}
        # (ran, always_dark) of the steps optimizer.step() ended that have not closed yet, oldest
        # first: a step closes at the next op with FLOPs, after the next step's first module calls.
        self.ended: list[tuple[dict, dict]] = []
        self.last: tuple | None = None  # take's last answer: (ran, always_dark, dark modules)

    def _module_pre(self, module, args) -> None:
        try:
            entry = self.kinds.by_id.get(id(module))  # SeenModules.get, inlined
            if entry is None or entry.ref() is not module:
                entry = self.kinds.add(module, _Kind(self.kinds.ref(module), module))
            if entry.kind:
                stack = self.stack
                if not stack:
                    return
                frame = stack[-1]
                if frame is not entry.frame:  # a frame of another name, or not this module's
                    if frame.ref() is not module:  # the Context did not take this call
                        return
                    entry.frame = frame  # a module's untagged frames are made once per name
                cls_name = entry.cls_name
                if type(module) is not entry.cls:  # its class was swapped since (a wrapper library)
                    cls_name = class_name(type(module))
                (self.always_dark if entry.kind == 2 else self.ran)[frame.name] = cls_name
        except Exception as exc:  # a meter never breaks training
            self.context.guard.failed("dark module watch", exc)

    def step_ended(self) -> None:
        """optimizer.step() ended the open step (automatic steps): the module calls from now on
        are the next step's, though the step closes only at the next op with FLOPs."""
        self.ended.append((self.ran, self.always_dark))
        self.ran, self.always_dark = {}, {}

    def holds(self) -> bool:
        """Some module call is recorded for a step not closed yet."""
        return bool(self.ran or self.always_dark or self.ended)

    def _record(self, ended: bool) -> tuple[dict, dict]:
        """The closing step's (ran, always_dark): the oldest ended step's when the step that
        optimizer.step() ended closes (``ended``), else everything recorded so far."""
        if ended and self.ended:
            return self.ended.pop(0)
        ran, always_dark = {}, {}
        for earlier_ran, earlier_always_dark in self.ended:
            ran.update(earlier_ran)
            always_dark.update(earlier_always_dark)
        ran.update(self.ran)
        always_dark.update(self.always_dark)
        self.ended, self.ran, self.always_dark = [], {}, {}
        return ran, always_dark

    def take(self, flops, repeated: bool = False, ended: bool = False) -> dict[str, str]:
        """Dark modules of the step whose FLOPs are ``flops``; starts the next step's record.
        ``repeated``: ``flops`` equal those of the last call (a steady loop): when the same modules
        ran, the last answer is the answer. ``ended``: the step optimizer.step() ended closes
        (``step_ended``), the module calls since are the next step's."""
        ran, always_dark = self._record(ended)
        if not ran and not always_dark:
            self.last = None
            return {}
        last = self.last
        if repeated and last is not None and last[0] == ran and last[1] == always_dark:
            return dict(last[2])
        dark = dark_in_step(ran, always_dark, [k for k, f in flops.items() if f])
        self.last = (dict(ran), dict(always_dark), dark)  # copies: never written to
        return dict(dark)


class _Kind:
    """A module as the watch sees it: 0 skip, 1 watch or 2 bypassing (``_kind``), its class and
    class name when first seen, the Context's frame of its last call (checked once per frame)."""
    __slots__ = ("ref", "kind", "cls", "cls_name", "frame")

    def __init__(self, ref, module) -> None:
        self.ref, self.kind, self.cls = ref, _kind(module), type(module)
        self.cls_name, self.frame = class_name(self.cls), None


def _kind(module) -> int:
    cls = type(module)
    if bypassing(cls):
        return 2
    if isinstance(module, LOOKUP_MODULES):
        return 0
    return 1 if next(module.parameters(recurse=False), None) is not None else 0
