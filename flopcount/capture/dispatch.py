"""The Python capture backend: a TorchDispatchMode that hands every aten op to the counter.

It implements the Capture protocol (capture/protocol.py): it books each op as it runs, so
``flush`` has nothing to do, and the Counter reports the step boundary (its ``on_work``, the
first op with FLOPs after ``optimizer.step()``), so ``mark_step_end`` has nothing to do either."""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Subclasses that only propagate shapes (DTensor's sharding propagation, torch.compile tracing).
_SHAPE_ONLY = (FakeTensor, FunctionalTensor)


class DispatchCapture(TorchDispatchMode):
    """Sees every aten op below autograd and autocast; the counter books its FLOPs."""

    def __init__(self, counter) -> None:
        super().__init__()
        self.counter = counter
        self.suspended = 0  # > 0 inside suspend(): compiled code (counted from its graph), the meter's own work

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Let torch.compile capture with the meter on (FlopCounterMode makes Dynamo skip frames).
        return True

    # ---- the Capture protocol (capture/protocol.py) -------------------------------------------
    def flush(self) -> None:
        """Every op is booked as it runs: nothing is held back."""

    def mark_step_end(self) -> None:
        """The Counter reports the next step's first op to the Meter itself (``on_work``)."""

    def discard(self) -> None:
        """Every op passes through uncounted from now on (each is booked as it runs: nothing is
        held back); off this thread's mode stack when it is on top of it."""
        self.suspended += 1
        if _get_current_dispatch_mode() is self:
            self.__exit__(None, None, None)

    @contextlib.contextmanager
    def suspend(self):
        """Ops inside the block pass through uncounted, on every thread."""
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1

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
