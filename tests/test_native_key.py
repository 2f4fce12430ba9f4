"""The native backend's two captures (capture/native/capture.py): the dispatch key (default) and the
RecordFunction observer give the same summaries as each other and as the dispatch backend; the
key leaves the thread when the meter ends, except once Dynamo has compiled with it; a bad
FLOPCOUNT_NATIVE_CAPTURE is one line before training. Closed forms: a Linear [n, i] -> [n, o] is
2*n*i*o forward and twice that backward (input and weight gradients)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import flopcount
from flopcount.capture import native
from flopcount.errors import BadInput

pytestmark = pytest.mark.skipif(native.load() is None, reason="native extension not available")

N, I, H, O = 4, 16, 32, 8


@pytest.fixture(autouse=True)
def _no_compiled_code():
    """A key meter starts only where Dynamo has not compiled without the key (earlier tests)."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(I, H), nn.ReLU(), nn.Linear(H, O))


def _summary(monkeypatch, capture, backend="native", autocast=False):
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", capture)
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(N, I)
    lib = native.load()
    kept = lib.key_included_here()  # kept on this thread since Dynamo compiled with it (an earlier test)
    with flopcount.meter(backend=backend, warn=False) as m:
        if backend == "native":
            assert lib.captures_by_key(m.capture.slot) == (capture == "key")
            assert lib.key_included_here() == (capture == "key" or kept)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = model(x)
            y.float().sum().backward()
            opt.step()
            opt.zero_grad()
            m.step()
    assert lib.key_included_here() == kept  # gone with the meter
    s = m.summary()
    return {k: s[k] for k in ("by_op", "by_phase_category", "by_module", "steps", "total_flops")
            if k in s}


@pytest.mark.parametrize("autocast", [False, True])
def test_key_recordfunction_and_dispatch_agree_with_the_closed_form(monkeypatch, autocast):
    key = _summary(monkeypatch, "key", autocast=autocast)
    observer = _summary(monkeypatch, "recordfunction", autocast=autocast)
    dispatch = _summary(monkeypatch, "key", backend="dispatch", autocast=autocast)
    assert key == observer
    assert key["by_op"] == dispatch["by_op"] and key["by_module"] == dispatch["by_module"]
    gemm = 2 * N * (I * H + H * O)  # per step, forward
    matmul = key["by_phase_category"]
    assert matmul["forward"]["matmul"] == 3 * gemm
    # backward: weight gradients of both layers, the input gradient of the second only
    assert matmul["backward"]["matmul"] == 3 * (2 * N * I * H + 2 * 2 * N * H * O)
    assert key["steps"] == 3


def test_bad_capture_is_one_line_before_training(monkeypatch):
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", "ring-buffer")
    with pytest.raises(BadInput) as info:
        with flopcount.meter(backend="native", warn=False):
            raise AssertionError("the meter must not start")
    assert "FLOPCOUNT_NATIVE_CAPTURE='ring-buffer'" in str(info.value) and "\n" not in str(info.value)


class Wrapper(torch.Tensor):
    """A wrapper subclass whose __torch_dispatch__ runs the op on the plain tensor inside it."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Wrapper) else t  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda t: Wrapper(t) if isinstance(t, torch.Tensor) else t, out)


@pytest.mark.parametrize("capture", ["key", "recordfunction"])
def test_subclass_inner_ops_are_counted_once(monkeypatch, capture):
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", capture)
    a, b = Wrapper(torch.randn(N, I)), Wrapper(torch.randn(I, H))
    with flopcount.meter(backend="native", warn=False) as m:
        torch.mm(a, b)
        torch.mm(torch.randn(N, I), torch.randn(I, H))  # a plain op after the subclass op
    assert m.summary()["by_op"]["aten.mm"] == {"flops": 2 * 2 * N * I * H, "calls": 2}


@pytest.mark.parametrize("capture", ["key", "recordfunction"])
def test_nothing_recorded_while_record_function_is_off(monkeypatch, capture):
    """The meter's own work (Meter._unmetered) runs with RecordFunction off: neither capture sees it."""
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", capture)
    with flopcount.meter(backend="native", warn=False) as m:
        torch._C._autograd._enable_record_function(False)
        try:
            torch.mm(torch.randn(N, I), torch.randn(I, H))
        finally:
            torch._C._autograd._enable_record_function(True)
        torch.mm(torch.randn(N, I), torch.randn(I, O))
    assert m.summary()["by_op"]["aten.mm"] == {"flops": 2 * N * I * O, "calls": 1}


def test_compiled_inside_a_key_meter_never_recompiles():
    """Dynamo guards on the thread's dispatch keys: code compiled under a key meter keeps the key
    on its thread, and code compiled before a meter makes later meters use RecordFunction."""
    code = textwrap.dedent(f"""
        import torch, torch.nn as nn, flopcount
        from flopcount.capture import native
        lib = native.load()
        torch.manual_seed(0)
        model = nn.Linear({I}, {H})
        compiled = torch.compile(model, fullgraph=True)
        x = torch.randn({N}, {I})
        gemm = 2 * {N} * {I} * {H}
        with torch._dynamo.config.patch(error_on_recompile=True):
            with flopcount.meter(backend="native", warn=False) as m:
                assert lib.captures_by_key(m.capture.slot)
                compiled(x).sum().backward()
            assert lib.key_included_here()  # kept: the compiled code guards on it
            compiled(x).sum().backward()  # outside a meter
            with flopcount.meter(backend="native", warn=False) as m2:
                assert lib.captures_by_key(m2.capture.slot)
                compiled(x).sum().backward()
                compiled(x).sum().backward()
        assert m.summary()["by_phase_category"]["forward"]["matmul"] == gemm
        f2 = m2.summary()["by_phase_category"]["forward"]["matmul"]
        assert f2 == 2 * m.summary()["by_phase_category"]["forward"]["matmul"], (f2, m.summary())
        # Compiled before a meter on a thread without the key: that meter uses RecordFunction.
        # (Code compiled with the key recompiles once on a thread without it: docs/architecture.md.)
        import threading
        out = {{}}
        def work():
            other = torch.compile(nn.Linear({I}, {H}), fullgraph=True)
            other(x)
            with torch._dynamo.config.patch(error_on_recompile=True):
                with flopcount.meter(backend="native", warn=False) as m3:
                    out["by_key"] = lib.captures_by_key(m3.capture.slot)
                    other(x)
                out["flops"] = m3.summary()["by_phase_category"]
        t = threading.Thread(target=work); t.start(); t.join()
        assert out["by_key"] is False, out
        assert sum(c.get("matmul", 0) for c in out["flops"].values()) == gemm, out  # a forward only
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


class Scaled(Wrapper):
    """A subclass whose clone does arithmetic (as a quantized tensor's copy dequantizes): a zero
    op of the registry on plain tensors, a matmul inside this subclass."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.clone.default:
            inner = args[0].inner
            return torch.mm(inner, torch.eye(inner.shape[-1]))  # [N, I] @ [I, I]
        raise NotImplementedError(func)


@pytest.mark.parametrize("backend, capture", [("native", "key"), ("native", "recordfunction"), ("dispatch", "key")])
def test_subclass_work_inside_a_zero_op_is_counted(monkeypatch, backend, capture):
    """A zero op passes the capture key unboxed on plain tensors only: on a subclass its
    __torch_dispatch__ is watched as for any other op."""
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", capture)
    with flopcount.meter(backend=backend, warn=False):
        torch.randn(N, I).clone()  # Python classifies clone (zero): the key passes it on unboxed from now on
    x = Scaled(torch.randn(N, I))
    with flopcount.meter(backend=backend, warn=False) as m:
        for _ in range(2):
            x.clone()
            torch.randn(N, I).clone()  # plain: nothing counted
    assert m.summary()["by_op"]["aten.mm"] == {"flops": 2 * 2 * N * I * I, "calls": 2}


def test_a_formula_registered_later_for_a_zero_op_is_counted(monkeypatch):
    """The key passes zero ops on without recording them while Python classifies them zero; a
    formula registered for one afterwards (public register_formula) is counted from then on."""
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", "key")
    x = torch.randn(N, I)
    with flopcount.meter(backend="native", warn=False) as m:
        for _ in range(3):
            x.clone()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::clone", "TESTING_ONLY_GenericMode")
    assert "aten.clone" not in m.summary()["by_op"]
    from flopcount.formulas import KNOWN_ZERO, REGISTRY
    aten = torch.ops.aten
    flopcount.register_formula(aten.clone, lambda shape, *args, out_shape, **kw: 7 * shape[0] * shape[1], override=True)
    try:
        with flopcount.meter(backend="native", warn=False) as m:
            assert native.load().captures_by_key(m.capture.slot)
            for _ in range(3):
                x.clone()
        assert m.summary()["by_op"]["aten.clone"] == {"flops": 3 * 7 * N * I, "calls": 3}
    finally:
        REGISTRY.add(aten.clone, KNOWN_ZERO, override=True)


@pytest.mark.parametrize("backend, capture", [("native", "key"), ("native", "recordfunction"), ("dispatch", "key")])
def test_decomposing_ops_are_seen_where_they_do_not_decompose(monkeypatch, backend, capture):
    """The key passes CompositeImplicitAutograd ops on unboxed only while an autograd key makes
    them decompose: under inference mode F.linear is seen itself (one aten.linear), with autograd
    (no_grad too) its parts are (aten.mm), in every capture."""
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", capture)
    x, w = torch.randn(N, I), torch.randn(H, I)
    with flopcount.meter(backend=backend, warn=False) as m:
        for _ in range(2):
            with torch.inference_mode():
                torch.nn.functional.linear(x, w)
                x.reshape(I, N).to(torch.float64)
            with torch.no_grad():
                torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(x, w.requires_grad_())
            w = w.detach()
    by_op = m.summary()["by_op"]
    assert by_op["aten.linear"] == {"flops": 2 * 2 * N * I * H, "calls": 2}
    assert by_op["aten.mm"] == {"flops": 2 * 2 * 2 * N * I * H, "calls": 4}
    assert set(by_op) == {"aten.linear", "aten.mm"} and not m.summary()["uncounted_ops"]


@pytest.mark.parametrize("capture", ["key", "recordfunction"])
def test_an_op_that_throws_books_nothing_and_the_meter_goes_on(monkeypatch, capture):
    """mm with mismatched shapes raises in its kernel (the key records mm unboxed): nothing is
    booked for it, the depth of seen ops is restored (the next ops are seen) and the error is
    the user's, unchanged."""
    monkeypatch.setenv("FLOPCOUNT_NATIVE_CAPTURE", capture)
    a, b = torch.randn(N, I), torch.randn(I, H)
    with flopcount.meter(backend="native", warn=False) as m:
        for bad in (torch.randn(H, I), torch.randn(I + 1, H)):
            with pytest.raises(RuntimeError, match="cannot be multiplied"):
                torch.mm(a, bad)
            torch.mm(a, b)
            a.add_(1.0)
    by_op = m.summary()["by_op"]
    assert by_op["aten.mm"] == {"flops": 2 * 2 * N * I * H, "calls": 2}
    assert by_op["aten.add_"] == {"flops": 2 * N * I, "calls": 2}
