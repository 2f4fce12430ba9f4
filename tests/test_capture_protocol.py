"""The Capture protocol, the Counter's redirect/detached, and the Meter's one step clock.

Both backends satisfy one protocol (capture/protocol.py); bookings change destination only
through the Counter's own context managers; a step close flushes the native capture once, with
no re-entry; the native observer's pause flag has one writer, whose pauses nest.
"""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

import flopcount
from flopcount.accounting import StepAccumulator
from flopcount.capture import compile as compiled_regions
from flopcount.capture.active import HOOKS
from flopcount.capture.context import Context, HookGuard
from flopcount.capture.counter import Counter
from flopcount.capture.dispatch import DispatchCapture
from flopcount.capture.protocol import Capture

PACKAGE = Path(flopcount.__file__).resolve().parent
M, K, N = 4, 8, 6
MM = 2 * M * K * N  # one [M, K] x [K, N] product


def _mm() -> None:
    torch.randn(M, K) @ torch.randn(K, N)


def _native_or_skip():
    from flopcount.capture import native

    if native.load_error() is not None:
        pytest.skip(f"native backend unavailable: {native.load_error()}")


def test_both_backends_satisfy_the_capture_protocol(backend):
    with flopcount.meter(backend=backend) as m:
        assert isinstance(m.capture, Capture)
        assert m.backend == backend
        with m.capture.suspend():  # suspended: the product is not the job's work
            _mm()
        m.capture.mark_step_end()
        _mm()
        m.capture.flush()
    assert m.summary()["hardware_flops"] == MM


def test_a_plain_object_is_not_a_capture():
    assert not isinstance(object(), Capture)
    assert isinstance(DispatchCapture(Counter(Context())), Capture)


def test_suspend_nests_and_resumes_at_the_outermost_end(backend):
    with flopcount.meter(backend=backend) as m:
        with m.capture.suspend():
            with m.capture.suspend():
                _mm()
            _mm()  # still inside the outer block
        _mm()  # counted
        m.step()
    assert m.summary()["hardware_flops"] == MM


def _counter():
    context = Context(guard=HookGuard(warn=False))
    closed = []
    return Counter(context, warn=False, on_work=lambda: closed.append(1)), closed


def test_counter_redirect_books_into_the_sink_and_closes_no_step():
    counter, closed = _counter()
    open_step = counter.acc
    sink = StepAccumulator()
    with DispatchCapture(counter):
        with counter.redirect(sink) as into:
            assert into is sink
            _mm()
        assert counter.acc is open_step and closed == []
        _mm()
    assert sum(sink.flops.values()) == MM
    assert sum(open_step.flops.values()) == MM
    assert closed == [1]  # the product outside the block told the step clock


def test_counter_detached_books_into_the_open_step_without_the_clock():
    counter, closed = _counter()
    with DispatchCapture(counter):
        with counter.detached():
            _mm()
            _mm()
        assert closed == []
        _mm()
    assert sum(counter.acc.flops.values()) == 3 * MM
    assert closed == [1]


def test_counter_redirect_restores_after_an_exception():
    counter, closed = _counter()
    open_step, on_work = counter.acc, counter.on_work
    with pytest.raises(KeyError):
        with counter.redirect(StepAccumulator()):
            raise KeyError("x")
    assert counter.acc is open_step and counter.on_work is on_work


def test_take_step_hands_over_the_open_step():
    counter, _ = _counter()
    with DispatchCapture(counter):
        _mm()
        taken = counter.take_step()
        _mm()
        _mm()
    assert sum(taken.flops.values()) == MM
    assert sum(counter.acc.flops.values()) == 2 * MM


class _Spy:
    """Counts the calls of a capture's real flush (and whether one ran inside another)."""

    def __init__(self, capture) -> None:
        self.flush, self.calls, self.depth, self.nested = capture.flush, 0, 0, 0
        capture.flush = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.nested += self.depth > 0
        self.depth += 1
        try:
            return self.flush(*args, **kwargs)
        finally:
            self.depth -= 1


def test_a_step_close_on_the_native_backend_flushes_once():
    _native_or_skip()
    with flopcount.meter(backend="native") as m:
        spy = _Spy(m.capture)
        _mm()
        m.step()
        assert spy.calls == 1 and spy.nested == 0
        assert m.last_step.hardware_flops == MM
    assert m.summary()["steps"] == 1


def test_an_automatic_step_close_on_the_native_backend_runs_straight_through():
    """optimizer.step() marks the end; the next module call finds the mark and flushes once,
    and the step clock closes the step inside that flush without flushing again."""
    _native_or_skip()
    torch.manual_seed(0)
    layer = torch.nn.Linear(K, N, bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(M, K)
    with flopcount.meter(backend="native") as m:
        layer(x).sum().backward()
        opt.step()
        spy = _Spy(m.capture)
        assert m.step_index == 0
        layer(x)  # its product crosses the mark; the module's end reports it: one flush closes step 0
        assert spy.calls == 1 and spy.nested == 0
        assert m.step_index == 1
    summary = m.summary()
    # Step 0: the forward product and, in backward, the weight gradient's product only (x needs
    # no gradient); the second forward's product is trailing work (no optimizer step after it).
    assert summary["steps"] == 1
    assert summary["by_phase_category"]["forward"]["matmul"] == 2 * MM
    assert summary["by_phase_category"]["backward"]["matmul"] == MM


def test_the_native_pause_flag_has_one_writer():
    """Only NativeCapture._pause calls the extension's set_paused."""
    writers = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for call in ast.walk(node):
                    if isinstance(call, ast.Attribute) and call.attr == "set_paused":
                        writers.append((path.relative_to(PACKAGE).as_posix(), node.name))
    assert writers == [("capture/native/capture.py", "_pause")]


def test_a_flush_inside_a_compiled_region_keeps_the_observer_paused():
    """The compiled region's pause and the flush's pause nest: the flush ending does not
    resume an observer that the region still holds paused."""
    _native_or_skip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(backend="native") as m:
            state = HOOKS.enter_region()
            try:
                m.capture.flush()
                _mm()  # inside the region: the region's graph counts its own work
            finally:
                HOOKS.leave_region(state)
            _mm()
            m.step()
    assert m.summary()["hardware_flops"] == MM
    assert compiled_regions.HOOKS is HOOKS


def test_active_registries_live_in_one_module(backend):
    from flopcount.capture import context
    from flopcount.capture.active import MODULE_HOOKS, active_contexts

    assert context.MODULE_HOOKS is MODULE_HOOKS
    with flopcount.meter(backend=backend) as m:
        assert HOOKS.meters[-1] is m and active_contexts()[-1] is m.context
        assert m.context in MODULE_HOOKS.contexts
    assert m not in HOOKS.meters and m.context not in active_contexts()
    assert m.context not in MODULE_HOOKS.contexts


def test_library_counters_are_registered_with_the_meter(backend):
    with flopcount.meter(backend=backend) as m:
        assert HOOKS.api_counters[-1] is m.counter
    assert m.counter not in HOOKS.api_counters
