"""torch.compile: count compiled regions from their aten graphs, with the same formula registry.

A dispatch mode does not see what Inductor-compiled code runs (fused kernels, extern GEMMs called
from generated code). Instead, every graph that Inductor compiles (the forward and the backward
graph after AOTAutograd, decomposed to aten ops, with shapes in ``node.meta["val"]``) is analysed
once at compile time: which ops, which formula, which phase (recomputed forward nodes in a
backward graph are ``recompute``) and which module (``nn_module_stack``). The compiled callable
is wrapped; on every call it binds the graph's symbolic sizes to the real input sizes, evaluates
the formulas for those sizes (cached per distinct size) and books the region's work through
each active meter's Counter. While a compiled region runs, the capture backends step aside
(off the dispatch mode stack, else ``Capture.suspend()``), so that extern kernels called from
compiled code are not counted twice.

How the hook gets in: ``torch._inductor.compile_fx.compile_fx`` (the entry point of the default
``inductor`` backend, imported by torch at compile time) is replaced by a wrapper that passes
Inductor a counting ``inner_compile``. Importing Inductor costs seconds, so flopcount patches it
when something else imports it (a meta-path hook), or at once if it is already imported.
While compiling, the AOTAutograd cache is bypassed (its hits skip ``inner_compile``); the
Inductor FX-graph cache, which holds the compiled code, still serves warm compiles.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import math
import re
import sys
import threading
import warnings
from typing import Any, NamedTuple

import torch

from ..conventions import NO_MODULE, RECOMPUTE, ROOT_MODULE
from ..formulas import KNOWN_ZERO, REGISTRY, known_zero
from ..formulas.registry import formula, launched_kernel
from . import cudagraphs, triton
from .active import HOOKS, MODULE_HOOKS
from .triton import kernel_args

_INDUCTOR = "torch._inductor.compile_fx"


aten, prims = torch.ops.aten, torch.ops.prims
# Prims that exist only once Inductor is imported; the static Inductor-only ops are in formulas/.
INDUCTOR_RANDOM = ("inductor_random", "inductor_seeds", "inductor_lookup_seed")  # random bits: zero


# ---- meters that compiled regions, CUDA graph replays and Triton launches book into ----------
def attach(meter) -> None:
    """Called by Meter.__enter__: compiled regions (and Triton launches, CUDA graph replays) book
    into ``meter.counter`` from now on (capture/active.py: the registry and its lifetime)."""
    install()
    cudagraphs.install()
    triton.watch_kernels()
    HOOKS.add(meter)


def detach(meter) -> None:
    HOOKS.remove(meter)


# ---- analysis of one aten graph ------------------------------------------------------------------
class Node(NamedTuple):
    name: str            # display name of the op
    formula: Any         # registry Formula, or None when uncounted
    why: str             # why it is uncounted
    args: tuple          # fx args (fx Nodes inside)
    kwargs: dict
    val: Any             # node.meta["val"] (output with symbolic shapes)
    phase: str | None    # RECOMPUTE for forward nodes recomputed in a backward graph
    module: str | None   # module path relative to the compiled root ("" = the root), None = unknown


class Booking(NamedTuple):
    name: str
    works: list | None   # None: uncounted (why in ``why``)
    why: str
    phase: str | None
    module: str | None


_MODULE_TOKEN = re.compile(r"\.(\w+)|\[(\d+)\]|\['([^']+)'\]|\[\"([^\"]+)\"\]")
# The traced frame's root: a local or global (``L['self']``, ``G['model']``), with the positional
# indexing of a wrapper's ``*args`` (``L['args'][0]``: decorated forwards such as Hugging Face's).
_MODULE_ROOT = re.compile(r"^(?:[LG]\[['\"][^'\"]*['\"]\](?:\[\d+\])*|self|\w+)")


def module_path(expr: str) -> list[str] | None:
    """``L['self'].layers[0]._modules['attn']`` -> ['layers', '0', 'attn']; None if unparsable."""
    root = _MODULE_ROOT.match(expr)
    if root is None:
        return None
    rest, parts, pos = expr[root.end():], [], 0
    for match in _MODULE_TOKEN.finditer(rest):
        if match.start() != pos:
            return None
        pos = match.end()
        token = next(g for g in match.groups() if g is not None)
        if token != "_modules":
            parts.append(token)
    return parts if pos == len(rest) else None


def relative_module(stack) -> str | None:
    """Innermost module of an ``nn_module_stack``, as a path below the traced frame's root
    (``L['self'].layers[0].attn`` -> 'layers.0.attn'); None when the node has no module."""
    if not stack:
        return None
    inner = list(stack.values())[-1]
    parts = module_path(str(inner[0] if isinstance(inner, tuple) else inner))
    return None if parts is None else ".".join(parts)


def join_module(current: str, relative: str | None) -> str:
    """Module of a compiled node: the module running the region, then the node's path inside it."""
    if relative is None:
        return current
    if current in (ROOT_MODULE, NO_MODULE):
        return relative or ROOT_MODULE
    return f"{current}.{relative}" if relative else current


def _entry(target):
    """(name, formula or None, why) for a graph node's target; None for nodes that do no work."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "aten" and target.__name__.startswith("sym_"):
            return None
        name, entry = REGISTRY.lookup(target)
        if entry is KNOWN_ZERO:
            return None
        return name, entry, "no formula"
    if isinstance(target, torch._ops.HigherOrderOperator):
        name, entry = REGISTRY.lookup(target)
        if entry is KNOWN_ZERO:
            return None
        return name, entry, "higher-order op inside a compiled region"
    if hasattr(target, "add_pre_run_hook"):  # a user Triton kernel called from the graph
        name, entry = REGISTRY.lookup(target)
        return None if entry is KNOWN_ZERO else (name, entry, "Triton kernel without a formula")
    return None  # Python operators on sizes (operator.mul, getitem, ...)


def _functionalized(node):
    """The op a wrapper node runs: auto_functionalized(op, **kwargs) runs ``op``; a user Triton
    kernel inside the graph (triton_kernel_wrapper_*) runs that kernel with its arguments."""
    target = node.target
    name = getattr(target, "__name__", "")
    if name in ("auto_functionalized", "auto_functionalized_v2") and node.args:
        return node.args[0], (), dict(node.kwargs)
    if name in ("triton_kernel_wrapper_functional", "triton_kernel_wrapper_mutation"):
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # Triton: optional

        kernel = launched_kernel(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]))
        merged = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]),
                  **node.kwargs["kwargs"]}
        return (kernel, *kernel_args(kernel, (), merged))
    return target, node.args, node.kwargs


def analyse(gm: torch.fx.GraphModule, is_backward: bool) -> list[Node]:
    nodes = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target, args, kwargs = _functionalized(node)
        found = _entry(target)
        if found is None:
            continue
        name, formula, why = found
        meta = node.meta
        recomputed = is_backward and meta.get("partitioner_tag") == "is_forward"
        stack = meta.get("nn_module_stack") if (recomputed or not is_backward) else meta.get("fwd_nn_module_stack")
        nodes.append(Node(name, formula, why, tuple(args), dict(kwargs), meta.get("val"),
                          RECOMPUTE if recomputed else None, relative_module(stack)))
    return nodes


# ---- symbolic sizes -> real sizes ------------------------------------------------------------------
def _symbol(x):
    """The sympy symbol behind a SymInt that is a plain symbol (s0), else None."""
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        if getattr(expr, "is_Symbol", False):
            return expr
    return None


def binders(placeholders: list) -> list[tuple[int, int | None, Any]]:
    """(input index, dim or None for a SymInt input, symbol) for every size symbol of the inputs."""
    out, seen = [], set()
    for i, val in enumerate(placeholders):
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                sym = _symbol(size)
                if sym is not None and sym not in seen:
                    seen.add(sym)
                    out.append((i, d, sym))
        else:
            sym = _symbol(val)
            if sym is not None and sym not in seen:
                seen.add(sym)
                out.append((i, None, sym))
    return out


class Unbound(Exception):
    """A size that the region's inputs do not determine (data-dependent shapes)."""


def concrete(value, mapping: dict):
    """Replace symbolic sizes by numbers and fake tensors by meta tensors of the real shape."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = value.node.expr.xreplace(mapping)
        if expr.free_symbols:
            raise Unbound(str(value.node.expr))
        kind = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(value)]
        return kind(expr)
    if isinstance(value, torch.Tensor):
        shape = [concrete(s, mapping) for s in value.shape]
        return torch.empty(shape, dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(concrete(v, mapping) for v in value)
    if isinstance(value, dict):
        return {k: concrete(v, mapping) for k, v in value.items()}
    return value


class Region:
    """One compiled graph: its counted nodes and, per distinct input sizes, their bookings."""

    def __init__(self, gm: torch.fx.GraphModule, is_backward: bool) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.index = {n: i for i, n in enumerate(placeholders)}
        self.binders = binders([n.meta.get("val") for n in placeholders])
        nodes = analyse(gm, is_backward)
        # Formulas that read the values of integer inputs (varlen offsets, group sizes) are
        # evaluated on every call; all others once per distinct input sizes.
        self.per_call = [n for n in nodes if self._reads_input_values(n)]
        self.nodes = [n for n in nodes if n not in self.per_call]
        self.plans: dict[tuple, list[Booking]] = {}

    def key(self, args) -> tuple:
        return tuple(int(args[i].shape[d]) if d is not None else int(args[i]) for i, d, _ in self.binders)

    def plan(self, args) -> list[Booking]:
        try:
            key = self.key(args)
        except Exception as exc:  # never break the compiled call; report the region instead
            return [Booking("compiled_region", None, f"input sizes unreadable: {type(exc).__name__}", None, None)]
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._evaluate(self.nodes, args, key)
        return plan + self._evaluate(self.per_call, args, key) if self.per_call else plan

    def _reads_input_values(self, node: Node) -> bool:
        def integer_input(x) -> bool:
            val = x.meta.get("val") if isinstance(x, torch.fx.Node) and x in self.index else None
            return isinstance(val, torch.Tensor) and not val.is_floating_point() and not val.is_complex()

        if node.formula is None or not node.formula.needs_values:
            return False
        leaves = [*node.args, *node.kwargs.values()]
        return any(integer_input(v) for x in leaves for v in (x if isinstance(x, (list, tuple)) else [x]))

    def _evaluate(self, nodes: list[Node], args, key) -> list[Booking]:
        import sympy

        mapping = {sym: sympy.Integer(v) for (_, _, sym), v in zip(self.binders, key)}
        plan = []
        for node in nodes:
            if node.formula is None:
                plan.append(Booking(node.name, None, node.why, node.phase, node.module))
                continue
            try:
                call_args = self._value(node.args, args, mapping)
                call_kwargs = self._value(node.kwargs, args, mapping)
                out = concrete(node.val, mapping)
                works = node.formula.works(call_args, call_kwargs, out)
                plan.append(Booking(node.name, works, "", node.phase, node.module))
            except Unbound as exc:
                plan.append(Booking(node.name, None, f"data-dependent size {exc} in a compiled region",
                                    node.phase, node.module))
            except Exception as exc:  # a formula must never break training; report the op instead
                plan.append(Booking(node.name, None, f"formula failed: {type(exc).__name__}: {exc}",
                                    node.phase, node.module))
        return plan

    def _value(self, x, args, mapping):
        if isinstance(x, torch.fx.Node):
            i = self.index.get(x)
            if i is not None and i < len(args):
                return args[i]  # a region input: the real tensor (formulas may read its values)
            return concrete(x.meta.get("val"), mapping)
        if isinstance(x, (list, tuple)):
            return type(x)(self._value(v, args, mapping) for v in x)
        if isinstance(x, dict):
            return {k: self._value(v, args, mapping) for k, v in x.items()}
        return concrete(x, mapping)


def book(counter, plan: list[Booking]) -> None:
    """Book one call of a compiled region into ``counter`` (phase and module as of now)."""
    context = counter.context
    phase, current = context.where()
    for b in plan:
        if b.works is None:
            counter.uncounted(b.name, b.why)
        else:
            counter.book(b.name, b.works, phase=b.phase or phase, module=join_module(current, b.module))


def counted_callable(region: Region, compiled):
    """Wrap an Inductor callable (boxed: one list argument, which it may clear)."""

    def run(args):
        plan = region.plan(args) if HOOKS.meters else None  # before the call: it frees ``args``
        state = HOOKS.enter_region()
        try:
            out = compiled(args)
        finally:
            HOOKS.leave_region(state)
        if plan is not None:
            for meter in state[0]:
                book(meter.counter, plan)
        return out

    run._boxed_call = True
    run.__wrapped__ = compiled
    return run


def counting_inner_compile(inner_compile):
    """``inner_compile`` for Inductor that analyses each graph before compiling it."""

    @functools.wraps(inner_compile)
    def inner(gm, example_inputs, *args, **kwargs):
        try:
            region = Region(gm, bool(kwargs.get("is_backward", False)))
        except Exception as exc:  # never break compilation; the region is reported as uncounted
            warnings.warn(f"flopcount: cannot analyse a compiled graph ({type(exc).__name__}: {exc}); "
                          "its work is uncounted", stacklevel=2)
            region = None
        result = inner_compile(gm, example_inputs, *args, **kwargs)
        compiled = getattr(result, "current_callable", None)
        if compiled is None:
            warnings.warn(f"flopcount: cannot count a compiled region of type {type(result).__name__}",
                          stacklevel=2)
        elif region is not None:
            result.current_callable = counted_callable(region, compiled)
        else:
            result.current_callable = counted_callable(_UncountedRegion(), compiled)
        return result

    return inner


class _UncountedRegion:
    def plan(self, args) -> list[Booking]:
        return [Booking("compiled_region", None, "graph analysis failed", None, None)]


# ---- installing the hook ------------------------------------------------------------------------
_compiling = threading.local()


def _patched_compile_fx(original):
    @functools.wraps(original)
    def compile_fx(model_, example_inputs_, inner_compile=None, *args, **kwargs):
        module = sys.modules[_INDUCTOR]
        inner = inner_compile or module.compile_fx_inner
        if getattr(_compiling, "depth", 0):  # compile_fx calls itself: wrap once
            return original(model_, example_inputs_, inner, *args, **kwargs)
        _compiling.depth = 1
        try:
            # AOTAutograd cache hits skip inner_compile: bypass that cache (Inductor's own stays).
            with torch._functorch.config.patch(enable_autograd_cache=False):
                return original(model_, example_inputs_, counting_inner_compile(inner), *args, **kwargs)
        finally:
            _compiling.depth = 0

    compile_fx.__flopcount__ = True
    return compile_fx


def patch_inductor(module) -> None:
    if not getattr(module.compile_fx, "__flopcount__", False):
        module.compile_fx = _patched_compile_fx(module.compile_fx)
        register_inductor_prims()


def register_inductor_prims() -> None:
    """Formulas for the prims that Inductor defines when it is imported."""
    known_zero(*(getattr(prims, n) for n in INDUCTOR_RANDOM if hasattr(prims, n)))
    if hasattr(prims, "fma"):  # fma(a, b, c) = a * b + c: one multiply-add, 2 FLOP per element
        formula(prims.fma, "pointwise")(_fma_flops)


def _fma_flops(*args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(out_shape)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        patch_inductor(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and linecache
        return getattr(self.loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches Inductor's compile_fx when it is first imported, keeping ``import flopcount`` cheap."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _INDUCTOR:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Make every later torch.compile (Inductor) region countable. Idempotent, cheap."""
    MODULE_HOOKS.install()  # Dynamo guards on global module hooks: they must predate compiles
    module = sys.modules.get(_INDUCTOR)
    if module is not None:
        patch_inductor(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
