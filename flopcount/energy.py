"""Energy and training time per step and per rank: moved to ``flopcount.resources`` (one module
per concern: counters, devices, sampler, rows, tally, prose; rank and local rank in
resources/rank.py). This module re-exports the names it always had, so ``flopcount.energy``
imports keep working."""
from .resources import *  # noqa: F401,F403
from .resources import __all__ as _resources_all
from .resources.counters import UnmeteredGpu as _UnmeteredGpu  # noqa: F401  (the names before the split)
from .resources.devices import cuda_names as _cuda_names, load_nvml as _load_nvml  # noqa: F401
from .resources.prose import coverage_text as _coverage_text  # noqa: F401
from .resources.tally import _RankTime, _Sample, _union_length  # noqa: F401

__all__ = list(_resources_all)
