"""CUDA graph bookkeeping, on CPU: work seen during capture is booked on every replay, not at capture.

No CUDA here, so the functions that the patched ``torch.cuda.CUDAGraph.capture_begin``,
``capture_end`` and ``replay`` call are driven directly around real (CPU) ops, with a plain object
standing in for the graph. benchmarks/gpu/cudagraph_check.py runs the real thing on a GPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import flopcount
from flopcount.capture import compile as compiled_regions
from flopcount.capture import cudagraphs


class Graph:
    """Holds what flopcount attaches to a torch.cuda.CUDAGraph."""


def capture(graph, fn):
    cudagraphs.begin_capture(graph)
    try:
        return fn()
    finally:
        cudagraphs.end_capture(graph)


@pytest.mark.parametrize("backend", ["dispatch", "native"])
def test_capture_books_nothing_and_each_replay_books_the_captured_work(backend):
    from flopcount.capture import native

    if backend == "native" and native.load() is None:
        pytest.skip("native extension not available")
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    graph = Graph()
    with flopcount.meter(backend=backend) as m:
        capture(graph, lambda: torch.relu(a @ b))
        captured = m.step()
        for _ in range(3):
            cudagraphs.replay(graph)
        replayed = m.step()
        a @ b  # eager work after capture is booked as usual
    assert captured.flops == {}
    mm = 2 * 4 * 8 * 5
    assert replayed.flops[("forward", "matmul", "<none>", "aten.mm")] == 3 * mm
    assert replayed.calls[("aten.mm", "forward")] == 3
    assert replayed.calls[("aten.relu", "forward")] == 3
    assert m.summary()["by_category"]["matmul"] == 4 * mm


def test_capture_keeps_phase_and_module_of_the_captured_ops():
    layer = torch.nn.Linear(8, 3)
    x = torch.randn(2, 8)
    graph = Graph()
    with flopcount.meter(backend="dispatch") as m:
        with torch.no_grad():
            capture(graph, lambda: layer(x))
        m.step()
        cudagraphs.replay(graph)
    assert m.last_step is not None
    summary = m.summary()
    assert summary["by_phase_category"]["eval"]["matmul"] == 2 * 2 * 8 * 3
    assert summary["by_module"]["<root>"] == 2 * 2 * 8 * 3 + 2 * 3  # addmm: GEMM + bias add


def test_graph_captured_outside_a_meter_is_reported_uncounted():
    graph = Graph()
    capture(graph, lambda: torch.randn(3, 3) @ torch.randn(3, 3))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with flopcount.meter(backend="dispatch") as m:
            cudagraphs.replay(graph)
            cudagraphs.replay(graph)
    assert m.summary()["uncounted_ops"] == {cudagraphs.REPLAY_NAME: 2}


def test_graph_captured_inside_a_compiled_region_is_left_to_the_region():
    graph = Graph()
    with flopcount.meter(backend="dispatch") as m:
        state = compiled_regions.HOOKS.enter_region()
        try:
            capture(graph, lambda: torch.randn(3, 3) @ torch.randn(3, 3))
        finally:
            compiled_regions.HOOKS.leave_region(state)
        cudagraphs.replay(graph)
    summary = m.summary()
    assert summary["hardware_flops"] == 0 and summary["uncounted_ops"] == {}


def test_no_patching_without_cuda():
    cudagraphs.install()
    assert getattr(torch.cuda.graphs.CUDAGraph, "__flopcount__", False) == torch.cuda.is_available()


def test_graph_of_ops_already_booked_before_capture_replays_them():
    # Warm-up steps before a capture (the usual CUDA-graph recipe) make the native backend book
    # the ops' keys with plans and hand their calls over as reused totals: the capture's tally
    # must still hold them.
    from flopcount.capture import native

    if native.load() is None:
        pytest.skip("native extension not available")
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    graph = Graph()
    mm = 2 * 4 * 8 * 5
    with flopcount.meter(backend="native") as m:
        for _ in range(3):  # warm-up: the same keys, step after step
            torch.relu(a @ b)
            warm = m.step()
        capture(graph, lambda: torch.relu(a @ b))
        captured = m.step()
        for _ in range(3):
            cudagraphs.replay(graph)
        replayed = m.step()
    assert warm.flops[("forward", "matmul", "<none>", "aten.mm")] == mm
    assert captured.flops == {}
    assert replayed.flops[("forward", "matmul", "<none>", "aten.mm")] == 3 * mm
    assert replayed.calls[("aten.mm", "forward")] == 3
    assert replayed.calls[("aten.relu", "forward")] == 3
