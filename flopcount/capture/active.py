"""The process-wide registries of the capture side: the one home of its global state.

Some work is seen by hooks that torch, Triton or the framework integrations call, not by a
meter's own capture; those hooks find the active meters here. Everything else a meter holds is
its own (Context, Counter, Capture).

``HOOKS.meters``: the active meters, in entering order. Added by ``Meter.__enter__`` (through
  ``capture/compile.py`` ``attach``, after the meter's capture started), removed by
  ``Meter.__exit__`` (``detach``, before its capture stops). Compiled regions
  (capture/compile.py), CUDA graph replays (capture/cudagraphs.py) and Triton launches
  (capture/triton.py) book into each of them: nested and concurrent meters each book the same work.
``HOOKS.contexts``: the Contexts of the active meters, for the framework tags
  (integrations/tags.py). Added by ``Context.install`` (``Meter.__enter__``), removed by
  ``Context.remove`` (``Meter.__exit__``), with the Context's other hooks.
``HOOKS.api_counters``: the Counters of the active meters, for libraries counted at their Python
  API (integrations/kernels.py). Added by ``watch_api_kernels`` (``Meter.__enter__``; the first
  one wraps the libraries' functions), removed with the meter's Context handles at ``__exit__``
  (the last one restores them).
``HOOKS.local``: per thread, how deep the thread is inside compiled regions (``enter_region`` /
  ``leave_region``, around each call of a compiled region; 0 outside them) and inside library
  calls counted at their Python API (``enter_api`` / ``leave_api``, integrations/kernels.py: their
  Triton launches are that call's work, capture/triton.py).
``MODULE_HOOKS``: the one pair of global module forward hooks, registered once per process and
  never removed (Dynamo guards on them); a Context subscribes while its meter is active
  (``Context.install`` / ``remove``), so do the integrations' module watches.
``MODEL_PHASES``: models whose every call is one phase (a DPO reference model -> ``reference``),
  and their parameters (``weights``), filled by integrations/tags.py; weak: a model's tag dies
  with the model (``ModelPhases``).
``PROJECTED``: hidden-state chunks that TRL's chunked divergence projected through an LM head
  in its forward -> the vocabulary tiles done (integrations/tags.py): a tile projected again is
  the second pass recomputing it. Keyed by identity, weak: an entry dies with its chunk.
The hooks installed into torch and Triton stay for the process: they are no-ops while no meter
is active. Lists are copied on write, so that hooks iterate them without a lock.

A forked child (os.fork, multiprocessing's fork start method, a fork-started DataLoader worker)
is not metered (docs/conventions.md, "Data loading"): one hook, registered
with ``os.register_at_fork`` when this module is first imported, stops in the child every meter
it inherited (``Hooks.stop_meters``) before the child runs any code of its own.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode, _push_mode
from torch.utils.weak import WeakIdKeyDictionary


class Hooks:
    """The active meters and their Contexts and, per thread, how deep we are inside compiled regions."""

    def __init__(self) -> None:
        self.meters: list = []
        self.contexts: list = []
        self.api_counters: list = []
        self.local = threading.local()

    def add(self, meter) -> None:
        self.meters = [*self.meters, meter]

    def remove(self, meter) -> None:
        self.meters = [m for m in self.meters if m is not meter]

    def add_context(self, context) -> None:
        self.contexts = [*self.contexts, context]

    def remove_context(self, context) -> None:
        self.contexts = [c for c in self.contexts if c is not context]

    def stop_meters(self, where: str) -> list:
        """This process is not metered (``where``: a DataLoader worker, a forked child): stop every
        active meter in it (``Meter.stop_in_worker``: nothing booked, nothing of its parent's trace
        written). Returns the meters stopped. A failure only says so: the process runs on."""
        stopped = []
        for meter in list(self.meters):
            try:
                meter.stop_in_worker()
                stopped.append(meter)
            except Exception as e:  # a meter never breaks the program
                sys.stderr.write(f"flopcount: could not stop metering {where} pid {os.getpid()}: {e}\n")
        return stopped

    def region_depth(self) -> int:
        return getattr(self.local, "depth", 0)

    def api_depth(self) -> int:
        return getattr(self.local, "api_depth", 0)

    def enter_api(self) -> None:
        self.local.api_depth = self.api_depth() + 1

    def leave_api(self) -> None:
        self.local.api_depth = max(self.api_depth() - 1, 0)

    def enter_region(self) -> tuple:
        """A compiled region starts: the meters' captures step aside. Returns what to undo."""
        self.local.depth = self.region_depth() + 1
        meters = list(self.meters)
        popped = _pop_captures(meters)
        suspended = contextlib.ExitStack()
        for meter in meters:
            if meter.capture not in popped:  # not on top of the mode stack, or not a dispatch mode
                suspended.enter_context(meter.capture.suspend())
        return meters, popped, suspended

    def leave_region(self, state: tuple) -> None:
        _, popped, suspended = state
        self.local.depth = self.region_depth() - 1
        for mode in reversed(popped):
            _push_mode(mode)
        suspended.close()


def _pop_captures(meters: list) -> list:
    """Take the meters' dispatch modes off the top of the mode stack: compiled code then runs
    with no Python dispatch at all (a mode that only passes ops through still costs per op)."""
    captures = [m.capture for m in meters]
    popped = []
    while any(_get_current_dispatch_mode() is c for c in captures):
        popped.append(_pop_mode())
    return popped


HOOKS = Hooks()


def _stop_meters_in_forked_child() -> None:
    """``os.fork`` returned in the child: its inherited meters and their trace writers are the
    parent's. They stop here; a child that then trains (optimizer steps) is told, once, that its
    work is in no trace."""
    if HOOKS.stop_meters("forked child"):
        try:
            _warn_once_if_training(os.getppid())
        except Exception as e:  # a meter never breaks the program
            sys.stderr.write(f"flopcount: forked child pid {os.getpid()} is not metered ({e})\n")


def _warn_once_if_training(parent: int) -> None:
    warned = []  # the hook stays (torch iterates its hooks: no removing from inside one)

    def on_optimizer_step(optimizer, args, kwargs) -> None:
        if not warned:
            warned.append(True)
            sys.stderr.write(f"flopcount: pid {os.getpid()}, forked from metered pid {parent}, runs optimizer "
                             "steps that no meter counts (forked children are not metered); start training "
                             "processes with spawn, forkserver or a launcher, or open a meter in the child\n")

    from torch.optim.optimizer import register_optimizer_step_post_hook  # torch.optim imports it lazily

    register_optimizer_step_post_hook(on_optimizer_step)


os.register_at_fork(after_in_child=_stop_meters_in_forked_child)  # once: at this module's first import


def active_contexts() -> list:
    """The Contexts of the active meters (``HOOKS.contexts``)."""
    return HOOKS.contexts


class _MutedDepth(threading.local):
    muted = 0  # a class default: reading it never misses (a missing attribute costs an exception)


class ModuleHooks:
    """One pair of global module forward hooks per process, registered once, never removed.

    Dynamo guards on the global hook dicts: hooks added and removed with each meter would make
    compiled models recompile whenever a meter starts or ends. While Dynamo traces, the hooks
    return at once (no graph breaks); compiled regions name their modules from the graph's
    ``nn_module_stack`` (capture/compile.py). Subscribers have ``_module_pre(module, args)`` and
    ``_module_post(module, args, output)`` (a Context, a module watch); either may be None (no
    work there). The hooks run for every module call of the job: they call the subscribers'
    bound methods, kept as tuples, and nothing else."""

    def __init__(self) -> None:
        self.contexts: list = []
        self.pres: tuple = ()  # the subscribers' _module_pre, in subscribing order
        self.posts: tuple = ()  # their _module_post
        self.installed = False
        self.local = _MutedDepth()  # muted depth per thread (muted())
        self.muting = 0  # muted blocks open in all threads: the hooks read ``local`` only when some are
        self.muting_lock = threading.Lock()

    def install(self) -> None:
        if not self.installed:
            mod = torch.nn.modules.module
            mod.register_module_forward_pre_hook(self._pre)
            mod.register_module_forward_hook(self._post, always_call=True)
            self.installed = True

    def subscribe(self, context) -> "ModuleHooks.Subscription":
        self.install()
        self._set([*self.contexts, context])
        return self.Subscription(self, context)

    def refresh(self) -> None:
        """A subscriber changed its hooks (Context.use_fast_path): read them again, in the same order."""
        self._set(list(self.contexts))

    def _set(self, contexts: list) -> None:
        # Copy on write: hooks iterate without a lock. Bound methods are made once, here.
        self.contexts = contexts
        self.pres = tuple(c._module_pre for c in contexts if c._module_pre is not None)
        self.posts = tuple(c._module_post for c in contexts if c._module_post is not None)

    class Subscription:
        def __init__(self, hooks: "ModuleHooks", context) -> None:
            self.hooks, self.context = hooks, context

        def remove(self) -> None:
            self.hooks._set([c for c in self.hooks.contexts if c is not self.context])

    @contextlib.contextmanager
    def muted(self):
        """No subscriber sees the module calls of this thread inside the block: flopcount's own
        model runs (integrations/vllm.py's forward on the meta device) are not the job's modules."""
        with self.muting_lock:
            self.muting += 1
        self.local.muted += 1
        try:
            yield
        finally:
            self.local.muted -= 1
            with self.muting_lock:
                self.muting -= 1

    # ``torch.compiler.is_compiling()``, in fewer Python frames (these run twice per module call):
    # True while Dynamo traces (``is_dynamo_compiling``, which Dynamo answers by identity, so the
    # hooks stay traceable and add nothing to the graph) and in eager code that runs inside a
    # compile session or a non-strict export (the flag); ``is_compiling`` itself adds
    # ``torch.jit.is_scripting()``, always False in eager Python. The thread-local muted depth is
    # read only while some thread is muted.
    def _pre(self, module, args) -> None:
        if _is_dynamo_compiling() or _compiler._is_compiling_flag or (self.muting and self.local.muted):
            return
        for pre in self.pres:
            pre(module, args)

    def _post(self, module, args, output) -> None:
        if _is_dynamo_compiling() or _compiler._is_compiling_flag or (self.muting and self.local.muted):
            return
        for post in self.posts:
            post(module, args, output)


_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_compiler = torch.compiler

MODULE_HOOKS = ModuleHooks()

class ModelPhases:
    """Models whose every call is one phase, e.g. a DPO reference model -> "reference", a
    distillation teacher -> "teacher" (integrations/tags.py fills it; weak: a model's tag dies
    with it). Each of their submodules is listed, so a call of the backbone alone is tagged too.
    ``version`` counts the changes: the module hooks keep each module's tag with the version
    they read it at (capture/context.py), instead of looking it up on every call.

    ``weights``: the same models' parameters -> phase, for code that uses a weight outside any
    call of its model (TRL's chunked distillation loss projects through the teacher's LM head
    weight itself). Keyed by identity (a tensor's ``==`` is elementwise), weak like the models."""

    def __init__(self) -> None:
        self.phases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.weights = WeakIdKeyDictionary()
        self.version = 0

    def get(self, module, default=None):
        return self.phases.get(module, default)

    def setdefault(self, module, phase: str) -> str:
        self.version += 1
        return self.phases.setdefault(module, phase)

    def __setitem__(self, module, phase: str) -> None:
        self.version += 1
        self.phases[module] = phase

    def pop(self, module, default=None):
        self.version += 1
        return self.phases.pop(module, default)

    def __len__(self) -> int:
        return len(self.phases)


MODEL_PHASES = ModelPhases()
PROJECTED = WeakIdKeyDictionary()
