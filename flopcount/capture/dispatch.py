"""The Python capture backend: a TorchDispatchMode that hands every aten op to the counter."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils._python_dispatch import TorchDispatchMode

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Subclasses that only propagate shapes (DTensor's sharding propagation, torch.compile tracing).
_SHAPE_ONLY = (FakeTensor, FunctionalTensor)


class DispatchCapture(TorchDispatchMode):
    """Sees every aten op below autograd and autocast; the counter books its FLOPs."""

    def __init__(self, counter) -> None:
        super().__init__()
        self.counter = counter
        self.suspended = 0  # > 0 while compiled code runs: capture/compile.py counts it from its graph

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Let torch.compile capture with the meter on (FlopCounterMode makes Dynamo skip frames).
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        # Tensor subclasses (DTensor, ...): let the subclass run its local ops, which come back
        # through this mode with local shapes; never count the wrapper op with global shapes.
        if any(t not in _PLAIN for t in types):
            if any(issubclass(t, _SHAPE_ONLY) for t in types):
                # Nothing is computed: hand the op to the modes below (FakeTensorMode), count nothing.
                # Returning NotImplemented here makes FakeTensor refuse the op too (dispatch fails).
                return func(*args, **kwargs)
            return NotImplemented
        entry = self.counter.before(func)
        out = func(*args, **kwargs)
        if entry is not None:
            self.counter.count(entry, args, kwargs, out)
        return out
