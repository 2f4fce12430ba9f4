"""Triton kernels launched directly (Liger-style fused kernels): counted per launch.

Every Triton kernel object (``JITFunction``; ``InterpretedFunction`` under ``TRITON_INTERPRET=1``)
has ``add_pre_run_hook(fn)``, called before each launch with the kernel's arguments, on GPU and
under the interpreter alike (Triton's global ``launch_enter_hook`` is not called by the
interpreter). When a meter starts, flopcount adds one hook to each kernel it can find: the
kernels given a formula with ``flopcount.register_formula(kernel, fn, category=...)`` and the
kernels that are attributes of loaded modules (how ``@triton.jit`` kernels are defined). A launch
books the kernel's formula (arguments as shapes, ``out_shape=None``); a kernel without a formula
is reported as uncounted. Hooks stay on the kernel (a no-op without an active meter).

Not counted here: launches inside compiled regions (the region's graph counts them). A custom
op that launches kernels is counted by the op's formula or by its kernels' formulas: give the
formula to one of them, not both. Launches made while Triton's autotuner benchmarks
configurations run the kernel and are counted as such.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

from ..formulas import KNOWN_ZERO, REGISTRY
from ..formulas.registry import launched_kernel
from .active import HOOKS

_HOOKED = "__flopcount_hooked__"


@contextlib.contextmanager
def counted_at_api():
    """Kernels launched inside a library call that integrations/kernels.py counts at its Python
    API (Liger, Unsloth, fla, mamba-ssm) are that call's work: not booked again, not uncounted."""
    enter_api()
    try:
        yield
    finally:
        leave_api()


def enter_api() -> None:
    HOOKS.enter_api()  # per thread (capture/active.py)


def leave_api() -> None:
    HOOKS.leave_api()


def is_kernel(obj) -> bool:
    """A Triton kernel that accepts pre-run hooks (JITFunction or InterpretedFunction)."""
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "add_pre_run_hook")


def kernels_in_modules() -> list:
    """Triton kernels bound to module attributes (including those wrapped by autotune/heuristics)."""
    found = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for value in list(namespace.values()):
            value = launched_kernel(value)
            if is_kernel(value) and not _library_kernel(value):
                found.append(value)
    return found


def _library_kernel(kernel) -> bool:
    # triton.language's @jit helpers are device functions, never launched; torch's own kernels
    # run inside aten ops, which the op's formula counts.
    module = getattr(getattr(kernel, "fn", None), "__module__", "") or ""
    return module.split(".")[0] in ("triton", "torch")


def constexpr_names(kernel) -> set[str]:
    annotations = inspect.get_annotations(getattr(kernel, "fn", kernel))
    return {n for n, a in annotations.items() if getattr(a, "__name__", str(a)).endswith("constexpr")}


def kernel_args(kernel, args, kwargs) -> tuple[tuple, dict]:
    """A launch's arguments as the formula gets them: the kernel's parameters in order, constexpr
    parameters as keywords; launch options that Triton adds (``num_warps``, ``debug``) dropped."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        return tuple(args), dict(kwargs)
    bound = dict(zip(names, args))
    bound.update((k, v) for k, v in kwargs.items() if k in names)
    constexprs = constexpr_names(kernel)
    return (tuple(bound[n] for n in names if n in bound and n not in constexprs),
            {n: bound[n] for n in names if n in bound and n in constexprs})


def make_hook(kernel):
    def pre_run(*args, **kwargs):
        if not HOOKS.meters or HOOKS.region_depth() or HOOKS.api_depth():
            return
        name, entry = REGISTRY.lookup(kernel)
        if entry is KNOWN_ZERO:
            return
        for meter in list(HOOKS.meters):
            counter = meter.counter
            if entry is None:
                counter.uncounted(name, "Triton kernel without a formula")
                continue
            counter.count((name, entry), *kernel_args(kernel, args, kwargs), None)

    return pre_run


def hook(kernel) -> None:
    """Add flopcount's pre-run hook to a kernel once."""
    if is_kernel(kernel) and not getattr(kernel, _HOOKED, False):
        kernel.add_pre_run_hook(make_hook(kernel))
        setattr(kernel, _HOOKED, True)


def watch_kernels() -> None:
    """Hook every Triton kernel flopcount can find (cheap when Triton is not imported)."""
    if "triton" not in sys.modules:
        return
    for op, _ in list(REGISTRY.items()):
        hook(op)
    for kernel in kernels_in_modules():
        hook(kernel)
