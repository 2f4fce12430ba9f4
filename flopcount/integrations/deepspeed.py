"""DeepSpeed: what its own fused kernels do to the count (docs/scale.md, "DeepSpeed").

DeepSpeed's engine, ZeRO stages 1-3 (partitioning, ZeRO-3 parameter gathering) and its
communication need nothing from flopcount: the model's work runs as aten ops, which both capture
backends count, and the gathers and reductions are torch.distributed collectives, which are
recorded as calls and bytes. DeepSpeed's fused optimizers are different: DeepSpeedCPUAdam,
FusedAdam, FusedLamb, the CPU Adagrad and Lion variants (and apex's fused optimizers) run their
whole update inside a C++ or CUDA extension called through pybind, below the dispatcher, so no
capture path sees a single op. They are counted at their Python API instead: after each
``step()`` (torch's global optimizer step hook), the parameters that have a gradient are booked in
phase ``optimizer`` with the per-element constants of torch's optimizers
(formulas/deepspeed.py). A fused optimizer class without a formula, and every forward of
DeepSpeed's fused transformer and inference-kernel modules (``deepspeed.ops.transformer``,
``deepspeed.model_implementations``), is booked as *uncounted* (by name, with its call count; an
error in strict mode) instead of silently counting zero FLOPs for it.
"""
from __future__ import annotations

import sys

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..conventions import OPTIMIZER
from ..formulas.deepspeed import optimizer_step_flops
from ..formulas.registry import Work

# Classes from these packages do their arithmetic inside their own C++/CUDA extensions.
OPAQUE_OPTIMIZER_PACKAGES = ("deepspeed.ops", "apex.optimizers")
OPAQUE_MODULE_PACKAGES = ("deepspeed.ops.transformer", "deepspeed.model_implementations")
WHY = ("it runs inside a C++/CUDA extension that no capture path sees (docs/scale.md); use torch "
       "ops for it or give it a formula to count it")


def opaque_name(obj, packages, method: str) -> str | None:
    """'deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam.step' for an object of a class from one of
    ``packages``, else None."""
    cls = type(obj)
    module = cls.__module__
    if any(module == p or module.startswith(p + ".") for p in packages):
        return f"{module}.{cls.__qualname__}.{method}"
    return None


def watch_opaque_kernels(counter) -> list:
    """Count every step of a fused optimizer from the parameters it updates (formulas/deepspeed.py),
    or book it as uncounted when its class has no formula; book every forward of an opaque
    DeepSpeed module as uncounted. Returns handles with ``remove()`` (call it when the meter
    exits). The optimizer hooks run once per optimizer step; the module check, once per module
    call and only when DeepSpeed is imported, rides on the meter's process-wide module hooks (new
    global module hooks would make compiled models recompile). Neither runs per op."""
    from ..capture.context import MODULE_HOOKS

    pending: dict[int, list] = {}  # id(optimizer) -> (options, elements) per group, read before the step

    def before_step(optimizer, args, kwargs) -> None:
        name = opaque_name(optimizer, OPAQUE_OPTIMIZER_PACKAGES, "step")
        if name is None:
            return
        class_name = name.rsplit(".", 1)[0]
        groups = updated_elements(optimizer)
        if optimizer_step_flops(class_name, groups) is None:
            counter.uncounted(name, WHY)
        else:
            pending[id(optimizer)] = groups

    def after_step(optimizer, args, kwargs) -> None:
        groups = pending.pop(id(optimizer), None)
        if groups is not None:  # booked once the step has run (a failed step books nothing)
            name = opaque_name(optimizer, OPAQUE_OPTIMIZER_PACKAGES, "step")
            flops = optimizer_step_flops(name.rsplit(".", 1)[0], groups)
            counter.book(name, [Work("pointwise", flops)], phase=OPTIMIZER)

    handles = [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
    if "deepspeed" in sys.modules:
        handles.append(MODULE_HOOKS.subscribe(_OpaqueModules(counter)))
    return handles


def updated_elements(optimizer) -> list:
    """(group options, elements of its parameters that have a gradient) per parameter group:
    the fused kernels update exactly those."""
    return [({k: v for k, v in group.items() if k != "params"},
             sum(p.numel() for p in group["params"] if getattr(p, "grad", None) is not None))
            for group in optimizer.param_groups]


class _OpaqueModules:
    """A module-hook subscriber (as capture.context.Context is) that reports opaque modules."""

    def __init__(self, counter) -> None:
        self.counter = counter
        self.names: dict[type, str | None] = {}  # module class -> uncounted name or None

    def _module_pre(self, module, args) -> None:
        cls = type(module)
        if cls not in self.names:
            self.names[cls] = opaque_name(module, OPAQUE_MODULE_PACKAGES, "forward")
        if self.names[cls] is not None:
            self.counter.uncounted(self.names[cls], WHY)

    def _module_post(self, module, args, output) -> None:
        pass
