"""The one formula registry: aten op (or custom op / Triton kernel) -> formula and category.

A formula is a pure function. It receives the op's arguments with every tensor replaced by its
shape (a tuple of ints; lists of tensors become lists of shapes), plus ``out_shape`` for the
result, and returns either an int (booked to the entry's category) or a list of ``Work`` items
when one op does several kinds of work (e.g. addmm: a GEMM and a bias add; fused attention
backward: backward GEMMs plus the recomputed score product).

Ops whose FLOPs depend on tensor *values* (varlen attention offsets, grouped GEMM offsets) are
registered with ``needs_values=True`` and receive the raw tensors instead of shapes.

Third-party libraries (bitsandbytes, flash-attn, xformers, ...) are registered by qualified op
*name*, ``"bitsandbytes::gemm_4bit"`` (every overload) or ``"bitsandbytes::gemm_4bit.out"`` (one
overload), never by op object: the formula files import nothing from the library, so they cost
nothing when it is absent, and an entry starts matching when the library defines its ops,
whenever that happens (before or after the meter starts). ``lookup`` tries the op object, its
packet, then the overload's and the op's name; the native backend receives the names as they are.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple

import torch

from ..conventions import CATEGORIES
from ..errors import BadInput, DuplicateFormula


class Work(NamedTuple):
    """Part of an op's work: ``flops`` in ``category``; ``phase`` overrides the op's phase."""

    category: str
    flops: int
    phase: str | None = None


@dataclass(frozen=True)
class Formula:
    fn: Callable[..., Any]
    category: str
    needs_values: bool = False
    # False: ``fn`` never reads a float scalar argument (the per-element table's formulas). The
    # native backend then keeps no float scalar in the op's key (it decodes as NaN), so that calls
    # differing only in one (AdamW's step size, changing every step) share one key and one booking.
    reads_scalars: bool = True

    def works(self, args, kwargs, out) -> list[Work]:
        """Evaluate the formula for one call and return its work items."""
        if self.needs_values:
            result = self.fn(*args, out=out, **kwargs)
        else:
            result = self.fn(*to_shapes(args), out_shape=to_shapes(out), **to_shapes(kwargs))
        if isinstance(result, int):
            return [Work(self.category, result)]
        return list(result)


class KnownZero:
    """Marker for ops that do no floating-point arithmetic (views, copies, indexing, casts, ...)."""

    def __repr__(self) -> str:
        return "KNOWN_ZERO"


KNOWN_ZERO = KnownZero()


def to_shapes(x):
    """Replace tensors by their shapes (tuples of ints), also inside lists, tuples and dicts."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        return type(x)(tuple(v.shape) if isinstance(v, torch.Tensor) else
                       to_shapes(v) if isinstance(v, (list, tuple)) else v for v in x)
    if isinstance(x, dict):
        return {k: to_shapes(v) for k, v in x.items()}
    return x


def op_name(op) -> str:
    """Stable display name: 'aten.mm', 'mylib.fused_rms_norm', or a kernel's qualified name."""
    if isinstance(op, torch._ops.OpOverload):
        op = op.overloadpacket
    if isinstance(op, torch._ops.OpOverloadPacket):
        return f"{op._qualified_op_name.replace('::', '.')}"
    if isinstance(op, torch._ops.HigherOrderOperator):
        return f"higher_order.{op.name()}"
    fn = getattr(op, "fn", op)  # Triton JITFunction wraps the Python function
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class Registry:
    """Maps ops to formulas or to KNOWN_ZERO. Lookups use the overload first, then its packet."""

    def __init__(self) -> None:
        self._table: dict[Any, Formula | KnownZero] = {}
        self._cache: dict[Any, tuple[str, Formula | KnownZero | None]] = {}
        self._zero_namespaces: set[str] = set()
        self.version = 0  # changes with every addition: the native backend re-sends the table then

    def add(self, op, entry: Formula | KnownZero, *, override: bool = False) -> None:
        """Register ``entry`` for ``op``. An op that already has another entry keeps it and
        ``DuplicateFormula`` is raised, unless ``override=True`` asks to replace it; registering
        the very same entry again (the same function, category and flags) changes
        nothing and is allowed."""
        if isinstance(entry, Formula) and entry.category not in CATEGORIES:
            raise BadInput(f"flopcount: category {entry.category!r} is not one of {', '.join(CATEGORIES)}")
        if isinstance(op, str) and "::" not in op:
            raise BadInput(f"flopcount: op name {op!r} must be qualified: 'namespace::name' or "
                           "'namespace::name.overload'")
        key = registry_key(op)
        existing = next((self._table[k] for k in _covering_keys(key) if k in self._table), None)
        if existing is not None and existing != entry and not override:
            raise DuplicateFormula(f"flopcount: {op_name(key) if not isinstance(key, str) else key} already has "
                                   f"{'a known-zero entry' if existing is KNOWN_ZERO else 'a formula'}; "
                                   "pass override=True to replace it")
        self._table[key] = entry
        self._cache.clear()
        self.version += 1

    def add_zero_namespace(self, namespace: str) -> None:
        """Every op of ``namespace`` (e.g. c10d collectives) is known-zero unless it has a formula."""
        self._zero_namespaces.add(namespace)
        self._cache.clear()
        self.version += 1

    def lookup(self, op) -> tuple[str, Formula | KnownZero | None]:
        """(display name, entry) for an op; entry None means uncounted. Cached per op object."""
        hit = self._cache.get(op)
        if hit is not None:
            return hit
        entry = self._table.get(op)
        if entry is None and isinstance(op, torch._ops.OpOverload):
            entry = self._table.get(op.overloadpacket)
            if entry is None and op.namespace != "aten":  # registered by name (third-party libraries)
                entry = self._table.get(f"{op._schema.name}.{op._overloadname}") or self._table.get(op._schema.name)
            if entry is None and op.namespace in self._zero_namespaces:
                entry = KNOWN_ZERO
            if entry is None and op.namespace != "aten":
                entry = torch_formula(op)
                if entry is None:  # not cached: torch's register_flop_formula may come later
                    return op_name(op), None
        hit = (op_name(op), entry)
        self._cache[op] = hit
        return hit

    def __contains__(self, op) -> bool:
        return self.lookup(op)[1] is not None

    def items(self):
        return self._table.items()


REGISTRY = Registry()


def _covering_keys(key) -> tuple:
    """The keys whose entry ``lookup`` would give ``key``'s op: its own, and for one overload
    also its packet's (by object or, for names, 'ns::name' for 'ns::name.overload')."""
    if isinstance(key, torch._ops.OpOverload):
        return key, key.overloadpacket
    if isinstance(key, str) and "." in key.split("::", 1)[-1]:
        return key, key.rsplit(".", 1)[0]
    return (key,)


def registry_key(op):
    """The object formulas are keyed by: a custom op's OpOverload for its ``CustomOpDef``, the
    launched ``JITFunction`` for a Triton ``Autotuner``/``Heuristics`` wrapper; a qualified name
    string as it is."""
    if isinstance(op, str):
        return op
    if isinstance(getattr(op, "_opoverload", None), torch._ops.OpOverload):  # torch.library.custom_op
        return op._opoverload
    return launched_kernel(op)


def launched_kernel(obj):
    """The kernel a Triton ``Autotuner`` / ``Heuristics`` wrapper launches (wrappers nest: follow
    ``.fn`` down to the ``JITFunction``); any other object as it is. The one place that unwraps
    them: formula keys, the kernels flopcount hooks and the kernels inside compiled graphs."""
    while type(obj).__name__ in ("Autotuner", "Heuristics") and hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def torch_formula(op) -> Formula | None:
    """Reuse a formula registered with torch's ``register_flop_formula`` for a non-aten op, booked
    as category ``other`` (register it with flopcount to choose the category). aten ops are not
    looked up there: flopcount's own formulas and conventions cover them. Nothing can be registered
    there before torch.utils.flop_counter is imported, and importing it imports Triton (a start-up
    cost that a job without Triton should not pay): a process that has not imported it has none."""
    flop_counter = sys.modules.get("torch.utils.flop_counter")
    if flop_counter is None:
        return None
    fn = flop_counter.flop_registry.get(op.overloadpacket)
    if fn is None:
        return None
    return Formula(functools.partial(_call_torch_formula, fn), "other", needs_values=True)


def _call_torch_formula(fn, *args, out=None, **kwargs):
    return int(fn(*args, out_val=out, **kwargs))


def _targets(ops) -> Iterable:
    return ops if isinstance(ops, (list, tuple, set, frozenset)) else (ops,)


def formula(ops, category: str, *, needs_values: bool = False, override: bool = False, reads_scalars: bool = True):
    """Decorator: register ``fn`` as the formula for one op or a list of ops (``override``: replace
    an entry the op already has; without it that raises DuplicateFormula; ``reads_scalars``: see
    ``Formula.reads_scalars``)."""

    def register(fn):
        for op in _targets(ops):
            REGISTRY.add(op, Formula(fn, category, needs_values, reads_scalars), override=override)
        return fn

    return register


def known_zero(*ops) -> None:
    for op in ops:
        REGISTRY.add(op, KNOWN_ZERO)


def register_formula(op, fn: Callable | None = None, *, category: str = "other", needs_values: bool = False,
                     override: bool = False, reads_scalars: bool = True):
    """Public API: give a custom op, aten op or Triton kernel its formula.

    ``fn(*args, out_shape=..., **kwargs) -> int | list[Work]`` receives shapes in place of tensors
    (raw tensors with ``needs_values=True``). An op that already has a formula or a known-zero
    entry (flopcount's own, or one registered before) keeps it: registering another raises
    ``flopcount.errors.DuplicateFormula`` unless ``override=True`` asks to replace it.

    ``reads_scalars=False`` promises that ``fn`` never reads the op's float scalar arguments
    (a learning rate, a step size, an ``eps``): the native backend then leaves them out of the
    op's key, so calls that differ only in such a value (a new one every step) share one key and
    one evaluation of ``fn``, and ``fn`` receives NaN in their place. Leave it True (the default)
    when the count depends on one; under the dispatch backend ``fn`` always gets the real values.
    It has no effect with ``needs_values=True`` (``fn`` gets the real arguments) or for Triton kernels.
    Usable directly or as a decorator::

        @flopcount.register_formula(torch.ops.mylib.rms_norm.default, category="norm")
        def rms_norm_flops(x_shape, w_shape, eps, *, out_shape):
            return 4 * math.prod(x_shape)
    """
    register = formula(op, category, needs_values=needs_values, override=override, reads_scalars=reads_scalars)
    if fn is None:
        return register
    register(fn)
    return fn
