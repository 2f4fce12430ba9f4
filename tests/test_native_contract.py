"""The contract between the native extension (csrc/) and Python, written once: the backward-module
nesting rule pinned on both stores by one table, the key layout's version checked when the
extension loads, and each op's class decided by the one registry (``classify``)."""
from __future__ import annotations

import warnings

import pytest
import torch

import flopcount
from flopcount.capture import native
from flopcount.capture.context import BackwardModules
from flopcount.capture.native import decode
from flopcount.conventions import ROOT_MODULE
from flopcount.errors import FlopcountError, NativeContractError
from flopcount.formulas import REGISTRY

pytestmark = pytest.mark.skipif(native.load_error() is not None,
                                reason=f"native backend unavailable: {native.load_error()}")

aten = torch.ops.aten
R = ROOT_MODULE

# ---- the backward-module nesting rule, one table for both stores ---------------------------------
# Each case: gradient-hook events in the order autograd fires them ("+name" enters a module's
# backward, "-name" leaves it) and the innermost module expected after each event.
NESTING = [
    ("plain nesting", ["+a", "+a.b", "-a.b", "-a"], ["a", "a.b", "a", None]),
    # An MLP returns its down projection's output: the outer module's hook fires after the inner
    # one's, and the outer module must sit below it.
    ("outer after inner", ["+a.b", "+a", "-a.b", "-a"], ["a.b", "a.b", "a", None]),
    ("outer after two inner", ["+a.b", "+a.b.c", "+a", "-a.b.c"], ["a.b", "a.b.c", "a.b.c", "a.b"]),
    ("the root sits below everything", ["+x.y", "+" + R, "-x.y"], ["x.y", "x.y", R]),
    ("a name prefix is not a parent", ["+layers", "+layer"], ["layers", "layer"]),
    ("nor the other way", ["+layer.1", "+layers"], ["layer.1", "layers"]),
    ("siblings stack", ["+a.x", "+a.y", "-a.y"], ["a.x", "a.y", "a.x"]),
    ("leave takes the innermost occurrence", ["+a", "+b", "+a", "-a"], ["a", "b", "a", "b"]),
    ("a second entry of the outer", ["+a", "+a.b", "+a", "-a", "-a.b"], ["a", "a.b", "a.b", "a.b", "a"]),
    ("leaving what never entered", ["+a", "-b", "-a", "-a"], ["a", "a", None, None]),
]


class _NativeStore:
    """The extension's stores for one meter slot, driven as capture/native/capture.py does."""

    def __init__(self, lib) -> None:
        self.lib, self.slot, self.ids = lib, lib.enable(False), {}

    def event(self, name: str, enter: bool) -> None:
        if name not in self.ids:
            self.ids[name] = len(self.ids)
            self.lib.set_module_name(self.slot, self.ids[name], name, name == ROOT_MODULE)
        self.lib.backward_event(self.slot, self.ids[name], enter)

    def innermost(self):
        module = self.lib.backward_module(self.slot, torch._C._current_graph_task_id())
        return next((n for n, i in self.ids.items() if i == module), None) if module >= 0 else None

    def close(self) -> None:
        self.lib.release(self.slot)


class _PythonStore:
    def __init__(self) -> None:
        self.store = BackwardModules()

    def event(self, name: str, enter: bool) -> None:
        (self.store.enter if enter else self.store.leave)(name)

    def innermost(self):
        return self.store.innermost(torch._C._current_graph_task_id())

    def close(self) -> None:
        self.store.clear()


@pytest.mark.parametrize("store", ["python", "native"])
@pytest.mark.parametrize("case, events, expected", NESTING, ids=[c[0] for c in NESTING])
def test_backward_module_nesting_rule(store, case, events, expected):
    s = _PythonStore() if store == "python" else _NativeStore(native.load())
    try:
        seen = []
        for event in events:
            s.event(event[1:], event[0] == "+")
            seen.append(s.innermost())
    finally:
        s.close()
    assert seen == expected, case


# ---- KEY_VERSION ------------------------------------------------------------------------------------

def test_key_version_of_the_loaded_extension_is_the_decoders():
    lib = native.load()
    assert lib.KEY_VERSION == decode.KEY_VERSION
    decode.check_key_version(lib)  # no error
    with pytest.raises(NativeContractError, match=r"keys of version \d+, this flopcount reads version \d+; rebuild"):
        decode.check_key_version(lib, expected=lib.KEY_VERSION + 1)


def test_key_version_mismatch_is_refused_at_load(monkeypatch):
    """A decoder of another layout than the loaded extension's: backend='native' raises a
    FlopcountError at Meter.__enter__, 'auto' says why and counts with the dispatch backend."""
    lib = native.load()
    monkeypatch.setattr(decode, "KEY_VERSION", lib.KEY_VERSION + 1)
    native._load.cache_clear()
    try:
        assert native.load() is None and "rebuild it with `flopcount build-native`" in native.load_error()
        with pytest.raises(FlopcountError, match="not available here: the native extension writes keys"):
            with flopcount.meter(backend="native"):
                pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with flopcount.meter(backend="auto") as m:
                torch.randn(3, 4) @ torch.randn(4, 5)
        assert m.backend == "dispatch" and m.summary()["by_category"]["matmul"] == 2 * 3 * 4 * 5
        assert any("writes keys of version" in str(w.message) for w in caught)
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.load() is not None


# ---- classification: the registry decides, the extension only keeps the answer ------------------

def test_classify_follows_the_registry():
    lib = native.load()
    K = lib.Klass

    def klass(op):
        return native.classify(lib, op, REGISTRY.lookup(op)[1])

    assert klass(aten.mm.default) == K.FORMULA
    assert klass(aten._grouped_mm.default) == K.FORMULA_VALUES  # offsets decide the FLOPs
    assert klass(aten.view.default) == K.ZERO
    assert klass(torch.ops._c10d_functional.all_reduce.default) == K.COLLECTIVE
    assert klass(torch.ops._c10d_functional.wait_tensor.default) == K.ZERO  # moves no data
    assert klass(aten.linalg_qr.default) == K.UNCOUNTED
    assert native.classify(lib, None, None) == K.UNCOUNTED  # an op Python cannot resolve


def test_an_op_first_seen_unclassified_is_booked_like_later_calls():
    """A custom op the process has never run: its first call is recorded before Python classifies
    it (at the next module call), later calls after; all are booked with the same FLOPs."""
    lib = torch.library.Library("flopcount_contract", "DEF")  # noqa: F841 (kept alive)
    lib.define("scale(Tensor x, float s) -> Tensor")
    lib.impl("scale", lambda x, s: x * s, "CompositeExplicitAutograd")
    op = torch.ops.flopcount_contract.scale.default

    @flopcount.register_formula(op, category="pointwise")
    def _scale(x_shape, s, *, out_shape):
        return 3 * x_shape[0] * x_shape[1]

    blocks = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Identity())
    with flopcount.meter(backend="native", warn=False) as m:
        op(torch.randn(4, 5), 2.0)  # first sight: not classified yet
        blocks(torch.randn(1))      # module calls: Python classifies it
        op(torch.randn(4, 5), 2.0)
        op(torch.randn(2, 5), 2.0)
    summary = m.summary()
    row = summary["by_op"]["flopcount_contract.scale"]
    assert (row["flops"], row["calls"]) == (3 * (4 * 5 + 4 * 5 + 2 * 5), 3)
    assert summary["by_category"]["pointwise"] == summary["hardware_flops"] == 3 * (4 * 5 + 4 * 5 + 2 * 5)
