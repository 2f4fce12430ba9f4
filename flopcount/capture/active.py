"""The process-wide registry of active meters: the one piece of global state of the capture side.

Compiled regions (capture/compile.py), CUDA graph replays (capture/cudagraphs.py) and Triton
launches (capture/triton.py) are seen by hooks that torch or Triton call, not by a meter's own
capture, so they find the meters to book into here.

Lifetime: a meter is in ``HOOKS.meters`` from its ``__enter__`` (``compile.attach``) to its
``__exit__`` (``compile.detach``), in entering order; nested and concurrent meters each book the
same work. ``HOOKS.local`` holds, per thread, how deep the thread is inside compiled regions;
it is 0 outside them. The hooks installed into torch / Triton stay for the process (they are
no-ops while no meter is active); the global module hooks are ``context.MODULE_HOOKS``.
"""
from __future__ import annotations

import threading

from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode, _push_mode


class Hooks:
    """The active meters and, per thread, how deep we are inside compiled regions."""

    def __init__(self) -> None:
        self.meters: list = []
        self.local = threading.local()

    def region_depth(self) -> int:
        return getattr(self.local, "depth", 0)

    def enter_region(self) -> tuple:
        """A compiled region starts: the meters' captures step aside. Returns what to undo."""
        self.local.depth = self.region_depth() + 1
        meters = list(self.meters)
        popped = _pop_captures(meters)
        for meter in meters:
            if getattr(meter, "capture", None) not in popped:
                _suspend(meter, +1)
        return meters, popped

    def leave_region(self, state: tuple) -> None:
        meters, popped = state
        self.local.depth = self.region_depth() - 1
        for mode in reversed(popped):
            _push_mode(mode)
        for meter in meters:
            if getattr(meter, "capture", None) not in popped:
                _suspend(meter, -1)


def _pop_captures(meters: list) -> list:
    """Take the meters' dispatch modes off the top of the mode stack: compiled code then runs
    with no Python dispatch at all (a mode that only passes ops through still costs per op)."""
    captures = [getattr(m, "capture", None) for m in meters]
    popped = []
    while any(_get_current_dispatch_mode() is c for c in captures):
        popped.append(_pop_mode())
    return popped


def _suspend(meter, delta: int) -> None:
    """Other captures (not on top of the stack, or not a dispatch mode) skip ops while suspended:
    a capture with an int ``suspended`` skips ops while it is positive."""
    capture = getattr(meter, "capture", None)
    if capture is None:
        return
    if hasattr(capture, "suspended"):
        capture.suspended += delta
    elif hasattr(getattr(capture, "lib", None), "set_paused"):
        # The native observer (capture/native/capture.py) has no ``suspended`` yet: pause its slot.
        depth = getattr(capture, "region_depth", 0) + delta
        capture.region_depth = depth
        capture.lib.set_paused(capture.slot, depth > 0)


HOOKS = Hooks()
