"""The one interface between a Meter and the way it sees ops: the ``Capture`` protocol.

Two backends implement it: ``capture/dispatch.py`` (``DispatchCapture``, a TorchDispatchMode that
books every op as it runs) and ``capture/native/capture.py`` (``NativeCapture``, a C++
RecordFunction observer that aggregates ops and books them in batches). The Meter, compiled
regions, CUDA graphs and the budget guard speak to either through these methods only.

The step clock belongs to the Meter (``Meter._step_boundary``). A capture never closes a step
itself; it reports where one ends:
- ``mark_step_end()``: ``optimizer.step()`` ended the open step (automatic steps). The step is
  closed before the next op with FLOPs: the dispatch backend's Counter reports that op
  (``Counter.on_work``); the native extension marks it and ``flush()`` reports the mark.
- ``flush()`` books what the capture aggregated so far, calling the Meter's clock once at each
  marked step end inside it. It never closes the open step itself, so closing a step (Meter
  ``_close``: flush, then close) runs straight through.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable


@runtime_checkable
class Capture(Protocol):
    """What a Meter needs from a capture backend."""

    def __enter__(self) -> "Capture":
        """Start seeing ops (the Meter has built its Context and Counter)."""

    def __exit__(self, exc_type, exc, tb) -> bool:
        """Stop seeing ops and book what is left (``flush``)."""

    def flush(self) -> None:
        """Book everything seen since the last flush into the Counter (a no-op for a capture
        that books each op as it runs); a no-op once the capture has exited."""

    def suspend(self) -> AbstractContextManager:
        """A block in which this capture sees no op, on any thread (compiled regions, the meter's
        own work). Nests: the capture resumes when the outermost block ends."""

    def mark_step_end(self) -> None:
        """``optimizer.step()`` ended the open step: the next op with FLOPs opens the next one."""

    def discard(self) -> None:
        """Stop seeing ops for good and book nothing it holds back: this process's ops are
        nobody's (a DataLoader worker, integrations/dataloader.py). Instead of ``__exit__``."""
