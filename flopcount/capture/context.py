"""Where the program is when an op runs: its phase and its module.

Phase rules (docs/conventions.md, "Phases"):
  1. inside ``optimizer.step()`` (global optimizer step hooks)           -> optimizer
  2. inside autograd's backward (graph task active), grad mode enabled     -> recompute
     (activation checkpointing re-runs forward code under enable_grad during backward,
     reentrant and non-reentrant alike), or an integration's ``recompute`` tag (a custom
     backward re-running forward work under no_grad, integrations/tags.py) -> recompute;
     grad mode disabled                                                    -> backward
  3. inside ``Meter.phase(name)``                                          -> that user phase
  4. grad enabled when the outermost module call or autograd.Function.apply began (or, outside
     both, grad enabled now)                                               -> forward, else
     provisional no-grad work, settled when its step closes (``settle_phase``):
  5. provisional work in a step that ran backward -> no_grad_training (training), else -> eval
Rule 4 looks at the outermost call so that code running under no_grad *inside* a training
forward (reentrant checkpoint's first forward, custom autograd.Function forwards, which autograd
always runs with grad disabled) stays forward.

Modules: global forward pre/post hooks keep a stack of fully qualified names (as
``named_modules()`` gives them, relative to the outermost module called: ``ModuleNames``, one
table per outermost module, so that a model reused inside a new wrapper takes the wrapper's
names there and keeps its own when called alone). Backward ops are
attributed through gradient hooks on each module's outputs (entered) and inputs (left), one
stack per autograd graph task, so reentrant backward inside checkpointing keeps its own
(``BackwardModules``; the native backend swaps in the same stacks kept in C++, whose gradient
hooks run no Python). With the native backend a module call runs no Python of flopcount's in the
common case: the extension's ``ModuleFastPath`` takes this Context's hooks (``use_fast_path``)
and does the stack push or pop, the context push and the gradient hooks on the autograd nodes
that made the module's tensors, one or several, or on the one leaf tensor among them (what
``NativeCapture.module_changed`` does); everything else comes to the Python methods, and what it
cannot decide alone (several leaves, a leaf with nodes, subclasses, other containers) to
``_when_grads``.
"""
from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections import Counter
from typing import Callable

import torch
from torch.autograd.graph import register_multi_grad_hook

from ..conventions import (BACKWARD, EVAL, FORWARD, NO_GRAD_TRAINING, NO_MODULE, OPTIMIZER, PROVISIONAL_NO_GRAD,
                           RECOMPUTE, ROOT_MODULE)
from ..errors import BudgetExceeded, UncountedOpError
# The process-wide registries (their lifetime is documented there); MODULE_HOOKS, MODEL_PHASES and
# active_contexts are also imported from here by the integrations.
from .active import HOOKS, MODEL_PHASES, MODULE_HOOKS, active_contexts  # noqa: F401

_graph_task_id = torch._C._current_graph_task_id
is_grad_enabled = torch.is_grad_enabled


def _passes_through() -> tuple:
    """The only exceptions the meter lets reach the training loop: asked for by the user."""
    return BudgetExceeded, UncountedOpError


class HookGuard:
    """A meter never breaks training: the meter's work inside module, autograd and optimizer
    hooks (and inside the ops it books) runs through ``call``/``failed``. A failure is recorded
    (``errors``: kind -> count, ``first``: kind -> the first message), warned about once per
    kind, and training goes on. Where a failure loses FLOPs, the caller books the op as
    uncounted, so the totals say they are a lower bound. Only ``BudgetExceeded`` and strict
    mode's ``UncountedOpError`` pass through."""

    def __init__(self, warn: bool = True) -> None:
        self.warn = warn
        self.errors: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def failed(self, kind: str, exc: BaseException) -> None:
        if isinstance(exc, _passes_through()):
            raise exc
        self.errors[kind] += 1
        if kind not in self.first:
            self.first[kind] = f"{type(exc).__name__}: {exc}"
            if self.warn:
                warnings.warn(f"flopcount: the meter failed in {kind} ({self.first[kind]}); training goes on, "
                              f"see meter_errors in the summary", stacklevel=3)

    def call(self, kind: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None after recording its failure."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.failed(kind, exc)
            return None

    def summary(self) -> dict:
        return {kind: {"count": n, "first": self.first[kind]} for kind, n in sorted(self.errors.items())}


def guarded(kind: str):
    """Decorator for Context methods that run inside hooks: failures go to ``self.guard``."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:
                self.guard.failed(kind, exc)
                return None
        return run
    return wrap


def resolve_phase(optimizer: bool, in_backward: bool, grad_enabled: bool, user_phase: str | None,
                  outer_grad: bool) -> str:
    """The phase rules above as one pure function, shared by the dispatch and native backends.

    ``outer_grad``: grad mode when the outermost module call or Function.apply began. A user
    phase never re-tags backward work, except ``recompute``: only integrations open it (a custom
    backward that recomputes forward values under no_grad, Meter.phase refuses the name)."""
    if optimizer:
        return OPTIMIZER
    if in_backward:
        return RECOMPUTE if grad_enabled or user_phase == RECOMPUTE else BACKWARD
    if user_phase:
        return user_phase
    return FORWARD if grad_enabled or outer_grad else PROVISIONAL_NO_GRAD


def settle_phase(phase: str, step_has_backward: bool) -> str:
    """Rule 5 (docs/conventions.md): no-grad work outside every explicit phase is provisional
    until its step closes; it fed the step's loss, training work, when the step also ran backward
    (a reference or teacher forward, a rollout, gradient clipping), else it is evaluation (an
    evaluation between epochs closed by its own step, the final evaluation after the last step).
    Explicit phases (``Meter.evaluating()``, ``Meter.phase``, the integrations' tags) are kept."""
    if phase != PROVISIONAL_NO_GRAD:
        return phase
    return NO_GRAD_TRAINING if step_has_backward else EVAL


def resolve_module(in_backward: bool, forward_module: str | None, backward_module: str | None) -> str:
    """Module of an op: the innermost forward module; in backward with no forward module open,
    the module whose backward is running."""
    if in_backward and forward_module is None:
        return backward_module or NO_MODULE
    return forward_module or NO_MODULE


class Frame:
    """One open module call on the forward stack. Immutable, and holding its module weakly: a
    module's two untagged frames (grad mode off, on) are made once and pushed on every call."""
    __slots__ = ("ref", "name", "grad_enabled", "tagged")

    def __init__(self, ref, name: str, grad_enabled: bool, tagged: bool = False) -> None:
        self.ref, self.name, self.grad_enabled = ref, name, grad_enabled
        self.tagged = tagged  # this call opened its model's phase (MODEL_PHASES)

    @property
    def module(self):
        return self.ref()


class Seen:
    """What a Context keeps of a module it has seen called: its name, its untagged frames and its
    model phase as of ``MODEL_PHASES.version``. ``SeenModules`` finds it in one dict lookup."""
    __slots__ = ("ref", "name", "frames", "tag", "tag_version")

    def __init__(self, ref, name: str) -> None:
        self.ref, self.name = ref, name
        self.frames = (Frame(ref, name, False), Frame(ref, name, True))
        self.tag, self.tag_version = None, -1


class SeenModules:
    """Per-module state by ``id(module)``, holding the module weakly (an entry goes with its
    module): one plain dict lookup per module call, where a WeakKeyDictionary builds a weak
    reference for every lookup. ``get`` checks the entry is this module's, not a dead one's
    whose id was reused."""

    def __init__(self) -> None:
        self.by_id: dict[int, object] = {}

    def get(self, module):
        entry = self.by_id.get(id(module))
        return entry if entry is not None and entry.ref() is module else None

    def ref(self, module):
        """A weak reference to ``module`` that removes its entry when the module dies."""
        key, by_id = id(module), self.by_id

        def forget(ref) -> None:
            entry = by_id.get(key)
            if entry is not None and entry.ref is ref:
                del by_id[key]
        return weakref.ref(module, forget)

    def add(self, module, entry):
        self.by_id[id(module)] = entry
        return entry


class ModuleNames:
    """Module names relative to the outermost module called (its *root*): one table per root.

    A root's table is made at its first outermost call from ``root.named_modules()`` (so that a
    submodule keeps its full name when called on its own later) and grows by the modules called
    inside the root that it does not hold, named after their parent. A module reused under
    several roots (a model trained alone, then run inside a new wrapper) has one name in each.

    ``view`` (the Context's ``seen``, which the native fast path reads too) holds the entries
    of the *current* table, the latest outermost call's, except the roots of other tables: the
    module hooks find a module's name there in one dict lookup. A module not there takes
    ``Context._seen``: an outermost call makes current the module's own table (it is a root),
    else the latest table holding it, else a new one rooted at it; a call inside the current
    root is named in its table. The other roots stay out of the view so that their next
    outermost call comes here: a reused model's root module takes Python's path when called
    inside a wrapper, every other module keeps the fast one; the view is rebuilt (one dict pass
    over the table) only when the root changes."""

    def __init__(self, view: SeenModules) -> None:
        self.view = view
        self.tables: dict[int, _RootTable] = {}  # id(root) -> its table, the latest current last
        self.current: _RootTable | None = None

    def outermost(self, module) -> Seen:
        """The entry of ``module`` called as the outermost module, its table made current."""
        table = self.tables.get(id(module))
        if table is None or table.root() is not module:
            table = next((t for t in reversed(self.tables.values()) if t.get(module) is not None), None)
            if table is None:
                table = self._new_table(module)
        self._make_current(table)
        return table.get(module)

    def inside(self, module, parent: Frame) -> Seen:
        """The entry of ``module`` called inside ``parent``'s call, in the current root's table."""
        table = self.current
        entry = table.get(module)
        if entry is None:
            child = next((n for n, m in parent.module._modules.items() if m is module), type(module).__name__)
            entry = self._add(table, module, child if parent.name == ROOT_MODULE else f"{parent.name}.{child}")
            if id(module) not in self.tables:  # another table's root stays out: its outermost calls come here
                self.view.by_id[id(module)] = entry
        return entry

    def name_of(self, module) -> str:
        """Its name in the current table, else its class name (a module seen in no call)."""
        entry = self.current.get(module) if self.current is not None else None
        return entry.name if entry is not None else type(module).__name__

    def _new_table(self, root) -> "_RootTable":
        table = _RootTable()
        for fqn, sub in root.named_modules():  # each module once, by its first name
            self._add(table, sub, fqn or ROOT_MODULE)
        table.root = table.by_id[id(root)].ref
        self.tables[id(root)] = table
        return table

    def _make_current(self, table: "_RootTable") -> None:
        key = id(table.root())
        self.tables[key] = self.tables.pop(key)  # the latest current last
        if table is self.current:
            return
        self.current = table
        roots, by_id = self.tables, self.view.by_id
        by_id.clear()  # in place: the native fast path holds this dict
        by_id.update({k: entry for k, entry in table.by_id.items() if k == key or k not in roots})

    def _add(self, table: "_RootTable", module, name: str) -> Seen:
        """A new entry for ``module`` in ``table``; when the module dies it leaves the table and
        the view, and a root takes its table along."""
        key, view = id(module), self.view.by_id

        def forget(ref) -> None:
            for by_id in (table.by_id, view):
                entry = by_id.get(key)
                if entry is not None and entry.ref is ref:
                    del by_id[key]
            if table.root is ref:
                if self.tables.get(key) is table:
                    del self.tables[key]
                if self.current is table:
                    self.current = None
                    view.clear()
        return table.add(module, Seen(weakref.ref(module, forget), name))


class _RootTable(SeenModules):
    """One root's entries (``ModuleNames``), and the weak reference to the root its entry holds."""

    def __init__(self) -> None:
        super().__init__()
        self.root = None


class Context:
    """Phase and module tracking for one meter. ``install()`` adds global hooks; ``remove()``."""

    def __init__(self, on_optimizer_step: Callable[[], None] | None = None, track_modules: bool = True,
                 guard: HookGuard | None = None) -> None:
        self.on_optimizer_step = on_optimizer_step
        self.track_modules = track_modules
        self.guard = guard or HookGuard()
        self.optimizer_depth = 0
        self.optimizer_steps = 0  # completed outermost optimizer.step() calls
        self.user_phases: list[str] = []
        self.forward_stack: list[Frame] = []
        self.function_grad: list[bool] = []  # grad mode at each active autograd.Function.apply
        self.backward = BackwardModules()  # which module's backward runs, per graph task
        self.seen = SeenModules()  # module -> Seen: what the module hooks read per call
        self.names = ModuleNames(self.seen)  # fills ``seen`` with the current root's names
        self.handles: list = []
        self.leaf_hooks: list = []  # gradient hooks on leaf tensors (removed when a step closes)
        # Told about every change of the state above (the native backend mirrors it in C++).
        self.listener = None
        # Run after this Context in each module call's pre hook, on the frame it just pushed (the
        # Meter's dark-module watch, capture/dark.py); set before a native capture starts, whose
        # ModuleFastPath does the watch's common case too.
        self.module_watch = None

    # ---- installation -------------------------------------------------------------------
    def install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.handles.append(register_optimizer_step_pre_hook(self._optimizer_pre))
        self.handles.append(register_optimizer_step_post_hook(self._optimizer_post))
        self.handles.append(_FunctionApplyHook(self.function_grad, self._changed))
        if self.track_modules:
            self.handles.append(MODULE_HOOKS.subscribe(self))
        self.handles.append(_Active(self))

    def use_fast_path(self, fast) -> None:
        """Let ``fast`` take this Context's module hooks (None: give them back): the native
        backend's ``ModuleFastPath`` (csrc/hooks.cpp) does the common case of ``_module_pre`` and
        ``_module_post`` (with ``NativeCapture.module_changed``) on this Context's own state
        without running Python, and calls these methods for everything else. It holds this
        Context: the capture gives the hooks back when it ends."""
        if fast is None:
            self.__dict__.pop("_module_pre", None)  # the methods again
            self.__dict__.pop("_module_post", None)
        else:
            self._module_pre, self._module_post = fast.pre, fast.post
        MODULE_HOOKS.refresh()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._remove_leaf_hooks()

    # ---- phase ----------------------------------------------------------------------------
    def where(self) -> tuple[str, str]:
        """(phase, module) of the op running now: the dispatch backend asks once per op."""
        task = _graph_task_id()
        stack = self.forward_stack
        forward = stack[-1].name if stack else None
        phase = resolve_phase(bool(self.optimizer_depth), task != -1, torch.is_grad_enabled(),
                              self.user_phases[-1] if self.user_phases else None, self._outer_grad())
        backward = self.backward.innermost(task) if task != -1 and forward is None else None
        return phase, resolve_module(task != -1, forward, backward)

    def snapshot(self) -> tuple:
        """The Python-held inputs of the phase and module rules:
        (optimizer, user phase, outermost call's grad mode, innermost forward module or None).
        Read at every module call with the native backend: ``_outer_grad`` is inlined."""
        stack, phases, functions = self.forward_stack, self.user_phases, self.function_grad
        return (bool(self.optimizer_depth), phases[-1] if phases else None,
                bool((stack and stack[0].grad_enabled) or (functions and functions[0])),
                stack[-1].name if stack else None)

    def _outer_grad(self) -> bool:
        """Grad mode when the outermost module call or autograd.Function.apply began."""
        stack, functions = self.forward_stack, self.function_grad
        return bool((stack and stack[0].grad_enabled) or (functions and functions[0]))

    @guarded("context tracking")
    def _changed(self) -> None:
        # The native backend's listener may close a step here (flush): never into the hook.
        if self.listener is not None:
            self.listener.context_changed()

    def push_user_phase(self, name: str) -> None:
        # Evaluation wins: phases opened inside an evaluation (GRPO's evaluation generates) are eval.
        self.user_phases.append(EVAL if EVAL in self.user_phases else name)
        self._changed()

    def pop_user_phase(self) -> None:
        self.user_phases.pop()
        self._changed()

    def push_tag(self, name: str) -> bool:
        """A framework integration's phase: opened only where no phase is open yet (the outermost
        tag, the user's explicit phase and an evaluation win); True when it was opened (pop it)."""
        if self.user_phases:
            return False
        self.push_user_phase(name)
        return True

    @guarded("optimizer hook")
    def _optimizer_pre(self, optimizer, args, kwargs):
        self.optimizer_depth += 1
        self._changed()
        # step(closure): the closure's forward and backward (Lightning, LBFGS) keep their phases.
        if args and callable(args[0]):
            return (self._outside_optimizer(args[0]), *args[1:]), kwargs
        if callable(kwargs.get("closure")):
            return args, {**kwargs, "closure": self._outside_optimizer(kwargs["closure"])}
        return None

    def _outside_optimizer(self, closure):
        def run_closure(*args, **kwargs):
            depth, self.optimizer_depth = self.optimizer_depth, 0
            self._changed()
            try:
                return closure(*args, **kwargs)
            finally:
                self.optimizer_depth = depth
                self._changed()
        return run_closure

    @guarded("optimizer hook")
    def _optimizer_post(self, optimizer, args, kwargs) -> None:
        self.optimizer_depth = max(0, self.optimizer_depth - 1)
        self._changed()
        if self.optimizer_depth == 0:
            self.optimizer_steps += 1
        if self.optimizer_depth == 0 and self.on_optimizer_step is not None:
            self.on_optimizer_step()  # closes the step; BudgetExceeded passes the guard

    # ---- modules --------------------------------------------------------------------------
    def _seen(self, module) -> Seen:
        """The module's entry for this call, where ``seen`` has none (``ModuleNames``)."""
        stack = self.forward_stack
        if stack and self.names.current is not None:
            return self.names.inside(module, stack[-1])
        return self.names.outermost(module)

    # The module hooks run for every module call of the job: the common case (a named module,
    # calls nested properly) is a few dict and list operations, one call into the extension with
    # the native backend, and no allocation but the snapshot's tuple. After the stack changed,
    # the listener is told (the native backend: the context push and the gradient hook on the one
    # autograd node that made the module's tensors, in one call); what it hands back, or without
    # a listener ``value`` itself, is hooked in Python (``_when_grads``): ``value`` is the call's
    # inputs at its start (their gradients leave the module in backward), its outputs at its end
    # (their first gradient enters it), None under no_grad.
    def _module_pre(self, module, args) -> None:
        self._enter_module(module, args)
        watch = self.module_watch
        if watch is not None:
            watch._module_pre(module, args)

    def _enter_module(self, module, args) -> None:
        try:
            seen = self.seen.by_id.get(id(module))  # SeenModules.get, inlined
            if seen is None or seen.ref() is not module:
                seen = self._seen(module)
            grad = is_grad_enabled()
            if seen.tag_version != MODEL_PHASES.version:
                seen.tag, seen.tag_version = MODEL_PHASES.get(module), MODEL_PHASES.version
            if seen.tag is not None and not self.user_phases:
                self.forward_stack.append(Frame(seen.ref, seen.name, grad, tagged=True))
                self.user_phases.append(seen.tag)
            else:
                self.forward_stack.append(seen.frames[grad])
        except Exception as exc:
            self.guard.failed("module hook", exc)
            return
        # Fires once gradients for all inputs exist: the module's backward is over.
        value = args if grad else None
        listener = self.listener
        if listener is not None:  # the context changed: the listener may flush here, never into the hook
            try:
                value = listener.module_changed(value, seen.name, False)
            except Exception as exc:
                self.guard.failed("context tracking", exc)
        if value is not None:
            self._hook_grads(value, seen.name, False)

    def _module_post(self, module, args, output) -> None:
        try:
            stack = self.forward_stack
            if stack and stack[-1].ref() is module:  # calls nest properly: the innermost ends
                frame = stack.pop()
                if frame.tagged and self.user_phases:
                    self.user_phases.pop()
                name = frame.name
            else:
                name = self._unwind(module)
            grad = is_grad_enabled()
        except Exception as exc:
            self.guard.failed("module hook", exc)
            return
        # Fires at the first gradient of an output: the module's backward begins.
        value = output if grad else None
        listener = self.listener
        if listener is not None:  # the context changed: the listener may flush here, never into the hook
            try:
                value = listener.module_changed(value, name, True)
            except Exception as exc:
                self.guard.failed("context tracking", exc)
        if value is not None:
            self._hook_grads(value, name, True)

    def _unwind(self, module) -> str:
        """``module`` ended with frames above its own (an exception skipped their post hooks,
        always_call): they end too. Its name; a module not on the stack ends alone."""
        stack = self.forward_stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].ref() is module:
                name = stack[i].name
                if any(frame.tagged for frame in stack[i:]) and self.user_phases:
                    self.user_phases.pop()
                del stack[i:]
                return name
        return self._names_get(module)

    def _hook_grads(self, value, name: str, enter: bool) -> None:
        """``_when_grads`` under the guard: what the listener left to Python (or, without one, all)."""
        try:
            self._when_grads(value, name, enter)
        except Exception as exc:
            self.guard.failed("module hook", exc)

    def _when_grads(self, value, name: str, enter: bool) -> None:
        """In backward, enter module ``name`` at the first gradient of the tensors in ``value``
        that require grad (``enter``), or leave it once all their gradients are computed.

        The common case, every such tensor made by one autograd node, is a pre-hook on that node:
        it runs when the node is about to run, i.e. once its gradients are complete, and dies
        with the graph (``BackwardModules.hook`` may place its own). Tensors from several nodes
        take torch's multi-grad hook (the native backend hooks those nodes in C++, to the same
        rule, before they reach here). Hooks on leaf tensors outlive the graph, so they are removed
        when the step closes. Python hooks find the stacks when they fire, not when hooked."""
        tensors = [t for t in _tensors(value) if t.requires_grad]
        if not tensors:
            return
        node = tensors[0].grad_fn
        one_node = node is not None and all(t.grad_fn is node for t in tensors[1:])
        if one_node and self.backward.hook(tensors[0], name, enter):
            return

        def fired(grads) -> None:
            self.guard.call("gradient hook", self.backward.enter if enter else self.backward.leave, name)

        if one_node:
            node.register_prehook(fired)
            return
        handle = register_multi_grad_hook(tensors, fired, mode="any" if enter else "all")
        if any(t.grad_fn is None for t in tensors):
            self.leaf_hooks.append(handle)

    def _names_get(self, module) -> str:
        return self.names.name_of(module)

    def reset_backward(self) -> None:
        """Drop finished graph tasks' module stacks (modules whose inputs need no grad never leave)."""
        self.backward.clear()
        self._remove_leaf_hooks()

    def _remove_leaf_hooks(self) -> None:
        hooks, self.leaf_hooks = self.leaf_hooks, []
        for handle in hooks:
            handle.remove()


class _Active:
    """Lists a context in ``HOOKS.contexts`` while its meter is entered (a handle, removed with
    the hooks; capture/active.py)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        HOOKS.add_context(context)

    def remove(self) -> None:
        HOOKS.remove_context(self.context)


class BackwardModules:
    """Which module's backward is running, one stack of names per autograd graph task. Gradient
    hooks on a module's outputs enter it, on its inputs leave it (``Context._when_grads``). The
    native backend replaces this with the same stacks kept in C++ (capture/native/capture.py)."""

    def __init__(self) -> None:
        self.stacks: dict[int, list[str]] = {}
        self.lock = threading.Lock()  # hooks run on autograd's threads

    def hook(self, tensor, name: str, enter: bool) -> bool:
        """Place a hook of this store's own on the node that made ``tensor``; False: none (the
        caller hooks it in Python)."""
        return False

    def enter(self, name: str) -> None:
        # Nested modules can share an output tensor (an MLP returns its down_proj's output); the
        # outer module's hook fires later but must sit below its submodules.
        with self.lock:
            stack = self.stacks.setdefault(_graph_task_id(), [])
            i = len(stack)
            while i > 0 and (name == ROOT_MODULE or stack[i - 1].startswith(name + ".")):
                i -= 1
            stack.insert(i, name)

    def leave(self, name: str) -> None:
        with self.lock:
            stack = self.stacks.get(_graph_task_id())
            if stack and name in stack:
                del stack[len(stack) - 1 - stack[::-1].index(name)]

    def innermost(self, task: int) -> str | None:
        stack = self.stacks.get(task)
        return stack[-1] if stack else None

    def clear(self) -> None:
        with self.lock:
            self.stacks.clear()


class _FunctionApplyHook:
    """Wraps autograd.Function.apply to record the grad mode its caller had: autograd runs every
    custom Function's forward with grad disabled, which must not make training work look like eval.
    Dynamo treats `apply` by name, so compiled code is unaffected."""

    def __init__(self, grad_stack: list[bool], changed: Callable[[], None]) -> None:
        function = torch.autograd.function.Function
        self.previous = function.__dict__["apply"]
        previous_fn = self.previous.__func__

        def apply(cls, *args, **kwargs):
            grad_stack.append(torch.is_grad_enabled())
            changed()
            try:
                return previous_fn(cls, *args, **kwargs)
            finally:
                grad_stack.pop()
                changed()

        self.installed = classmethod(apply)
        function.apply = self.installed

    def remove(self) -> None:
        function = torch.autograd.function.Function
        if function.__dict__.get("apply") is self.installed:
            function.apply = self.previous


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, torch.Tensor):
                yield v
    elif isinstance(x, dict):
        for v in x.values():
            if isinstance(v, torch.Tensor):
                yield v
    elif hasattr(x, "to_tuple"):  # Hugging Face ModelOutput
        yield from _tensors(x.to_tuple())
