"""The Python capture backend: a TorchDispatchMode that hands every aten op to the counter."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class DispatchCapture(TorchDispatchMode):
    """Sees every aten op below autograd and autocast; the counter books its FLOPs."""

    def __init__(self, counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Tensor subclasses (DTensor, ...): let the subclass run its local ops, which come back
        # through this mode with local shapes; never count the wrapper op with global shapes.
        if any(t not in _PLAIN for t in types):
            return NotImplemented
        entry = self.counter.before(func)
        out = func(*args, **kwargs)
        if entry is not None:
            self.counter.count(entry, args, kwargs, out)
        return out
