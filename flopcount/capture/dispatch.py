"""The Python capture backend: a TorchDispatchMode that hands every aten op to the counter.

It implements the Capture protocol (capture/protocol.py): it books each op as it runs, so
``flush`` has nothing to do, and the Counter reports the step boundary (its ``on_work``, the
first op with FLOPs after ``optimizer.step()``), so ``mark_step_end`` has nothing to do either.
Dynamo never traces ``__torch_dispatch__`` (``_outside_dynamo``), and an eager job never imports
Dynamo for it."""
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
    def _should_skip_dynamo(cls) -> bool:
        # Not torch's wrapper around __torch_dispatch__ (it imports Dynamo and Triton at the first
        # op): _outside_dynamo, below the class, keeps Dynamo off our frames just as well.
        return False

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



def _outside_dynamo(dispatch):
    """``dispatch`` that Dynamo never traces, as torch's own ``_disable_dynamo(recursive=True)``
    makes it, without importing Dynamo (and with it Inductor and Triton, about a second) at the
    first op of an eager job: only a thread that runs compiled code (its eval-frame callback set,
    Dynamo imported already) takes torch's disabled path. The wrapper's own frame is skipped the
    way torch's ``skip_code`` skips one. Without those torch._C hooks: torch's wrapper."""
    disabled = torch._disable_dynamo(dispatch, recursive=True)
    frames = getattr(torch._C, "_dynamo", None)
    frames = getattr(frames, "eval_frame", None)
    if not all(hasattr(frames, name) for name in ("get_eval_frame_callback", "set_code_exec_strategy",
                                                  "_FrameExecStrategy", "_FrameAction")):
        return disabled
    callback = frames.get_eval_frame_callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if callback() is None:  # no compiled code runs in this thread: Dynamo sees no frame
            return dispatch(self, func, types, args, kwargs)
        return disabled(self, func, types, args, kwargs)

    skip = frames._FrameExecStrategy(frames._FrameAction.SKIP, frames._FrameAction.DEFAULT)
    frames.set_code_exec_strategy(__torch_dispatch__.__code__, skip)
    return __torch_dispatch__


DispatchCapture.__torch_dispatch__ = _outside_dynamo(DispatchCapture.__dict__["__torch_dispatch__"])
