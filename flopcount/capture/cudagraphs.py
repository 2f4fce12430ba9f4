"""CUDA graphs: the work captured into a graph is booked on every replay.

While a graph is being captured (``torch.cuda.graph``, ``make_graphed_callables``) its kernels
are recorded, not run: the ops that the capture backend sees then are recorded into the graph's
tally instead of the open step. Each ``CUDAGraph.replay()`` books the tally again, with the phase
and module they had at capture. Graphs captured inside a compiled region (the cudagraph trees of
``torch.compile(mode="reduce-overhead")``) have an empty tally: the compiled region books its work
on every call, replay or not. A graph captured while no meter was active cannot be counted: its
replays are reported as uncounted (``torch.cuda.CUDAGraph.replay``).
"""
from __future__ import annotations

import contextlib

from ..accounting import StepAccumulator
from ..formulas.registry import Work
from .active import HOOKS

TALLY = "_flopcount_tally"       # list of (phase, module, op, works or None), or None
CAPTURE = "_flopcount_capture"   # (the recorder, the meters' redirects into it, to close at capture end)
REPLAY_NAME = "torch.cuda.CUDAGraph.replay"
TOTALS = "totals"  # a tally entry holding summed totals (Recorder.add_totals), not one call


class Recorder(StepAccumulator):
    """Stands in for a counter's accumulator during capture: keeps each booking, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.bookings: list[tuple] = []

    def add(self, phase, module, op, works) -> None:
        self.bookings.append((phase, module, op, list(works)))

    def add_repeated(self, booked) -> None:
        for entries, (op, phase), count in booked:
            module = entries[0][0][2] if entries else None  # no entries, no FLOPs: module moot
            works = [Work(category, flops, None if p == phase else p) for (p, category, _, _), flops in entries]
            self.bookings.extend([(phase, module, op, works)] * count)

    def add_totals(self, flops: dict, calls: dict) -> None:
        # The native backend's reused totals of keys booked before the capture (warm-up steps).
        if flops or calls:
            self.bookings.append((TOTALS, None, None, (dict(flops), dict(calls))))

    def add_uncounted(self, op) -> None:
        self.bookings.append((None, None, op, None))

    def add_collective(self, op, nbytes) -> None:  # communication in a graph: no FLOPs
        pass


def begin_capture(graph) -> None:
    if HOOKS.region_depth():
        setattr(graph, TALLY, [])  # a compiled region's graph: the region counts itself
        return
    if not HOOKS.meters:
        setattr(graph, TALLY, None)
        return
    recorders = contextlib.ExitStack()
    first = None
    for meter in HOOKS.meters:
        meter.capture.flush()  # work seen before the capture (native: aggregated, not booked yet) stays in the step
        recorder = Recorder()
        first = first or recorder
        recorders.enter_context(meter.counter.redirect(recorder))  # capture runs nothing: no step closes
        recorders.callback(meter.capture.flush)  # at capture end, first: the capture's work into the recorder
    setattr(graph, CAPTURE, (first, recorders))


def end_capture(graph) -> None:
    state = getattr(graph, CAPTURE, None)
    if state is None:
        return
    delattr(graph, CAPTURE)
    recorder, recorders = state
    recorders.close()
    setattr(graph, TALLY, recorder.bookings)


def replay(graph) -> None:
    if not HOOKS.meters or HOOKS.region_depth():
        return
    tally = getattr(graph, TALLY, None)
    for meter in list(HOOKS.meters):
        counter = meter.counter
        if tally is None:
            counter.uncounted(REPLAY_NAME, "CUDA graph captured while no meter was active")
            continue
        for phase, module, op, works in tally:
            if phase is TOTALS:
                counter.book_totals(*works)
            elif works is None:
                counter.uncounted(op, "no formula (captured in a CUDA graph)")
            else:
                counter.book(op, works, phase=phase, module=module)


def install() -> None:
    """Wrap ``torch.cuda.CUDAGraph``'s capture and replay once (only where CUDA is available)."""
    import torch

    if not torch.cuda.is_available():
        return
    cls = torch.cuda.graphs.CUDAGraph
    if getattr(cls, "__flopcount__", False):
        return
    capture_begin, capture_end, replay_graph = cls.capture_begin, cls.capture_end, cls.replay

    def patched_begin(self, *args, **kwargs):
        result = capture_begin(self, *args, **kwargs)
        begin_capture(self)
        return result

    def patched_end(self, *args, **kwargs):
        try:
            return capture_end(self, *args, **kwargs)
        finally:
            end_capture(self)

    def patched_replay(self, *args, **kwargs):
        result = replay_graph(self, *args, **kwargs)
        replay(self)
        return result

    cls.capture_begin, cls.capture_end, cls.replay = patched_begin, patched_end, patched_replay
    cls.__flopcount__ = True
