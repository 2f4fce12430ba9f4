"""The per-module-call path (capture/active.py ModuleHooks, Context._module_pre/_module_post, the
native backend's ModuleFastPath in csrc/hooks.cpp): every FLOP keeps its module on both backends,
against closed forms computed here, for nested and shared modules, calls under no_grad, a model
phase set after its model was first seen, an exception inside a module, a meter entered inside a
module call and activation checkpointing."""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

import flopcount
from flopcount.capture import native
from flopcount.capture.active import MODEL_PHASES, MODULE_HOOKS
from flopcount.conventions import ROOT_MODULE
from flopcount.capture.context import SeenModules

BACKENDS = ["dispatch", pytest.param("native", marks=pytest.mark.skipif(
    native.load_error() is not None, reason=f"native backend unavailable: {native.load_error()}"))]

M, D, H = 3, 4, 6  # rows, width, hidden width


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(D, H, bias=False)
        self.down = torch.nn.Linear(H, D, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Net(torch.nn.Module):
    """proj -> two residual MLP blocks -> the shared projection twice -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(D, D, bias=False)
        self.blocks = torch.nn.ModuleList(MLP() for _ in range(2))
        self.shared = torch.nn.Linear(D, D, bias=False)
        self.head = torch.nn.Linear(D, 1, bias=False)

    def forward(self, x):
        x = self.proj(x)
        for block in self.blocks:
            x = x + block(x)
        x = self.shared(self.shared(x))
        return self.head(x).sum()


def mm(k: int, n: int) -> int:
    """[M, k] x [k, n]"""
    return 2 * M * k * n


def matmul_by(flops: dict, phase: str) -> dict:
    out: dict = {}
    for (p, category, module, _), f in flops.items():
        if p == phase and category == "matmul":
            out[module] = out.get(module, 0) + f
    return out


def merged(steps: list[dict]) -> list[dict]:
    """Steps' FLOPs with in-place op names merged: under a TorchDispatchMode autograd accumulates
    out of place (aten.add), natively in place (aten.add_); the same FLOPs."""
    out = []
    for flops in steps:
        step: dict = {}
        for (phase, category, module, op), f in flops.items():
            key = (phase, category, module, op.rstrip("_"))
            step[key] = step.get(key, 0) + f
        out.append(step)
    return out


def expected_forward() -> dict:
    per_block = {"up": mm(D, H), "down": mm(H, D)}
    rows = {"proj": mm(D, D), "shared": 2 * mm(D, D), "head": mm(D, 1)}
    for i in range(2):
        rows.update({f"blocks.{i}.{name}": f for name, f in per_block.items()})
    return rows


def expected_backward() -> dict:
    """Input and weight gradients everywhere but proj, whose input needs none."""
    return {name: (f if name == "proj" else 2 * f) for name, f in expected_forward().items()}


def run(backend: str, body, steps: int = 3, model=None) -> list[dict]:
    """Each step's FLOPs; ``model``'s gradients are dropped after each step (accumulating into
    them would add work)."""
    per_step = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(backend=backend, warn=False) as m:
            for _ in range(steps):
                body(m)
                if model is not None:
                    model.zero_grad(set_to_none=True)
                m.step()
                per_step.append(dict(m.last_step.flops))
    return per_step


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_and_shared_modules_closed_form(backend):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(M, D)

    def body(m):
        model(x).backward()
        with torch.no_grad():
            model(x)  # the same modules again, no grad: eval work, the same names

    for flops in run(backend, body, model=model):
        assert matmul_by(flops, "forward") == expected_forward()
        assert matmul_by(flops, "backward") == expected_backward()
        assert matmul_by(flops, "no_grad_training") == expected_forward()


@pytest.mark.skipif(native.load_error() is not None, reason="native backend unavailable")
def test_both_backends_give_the_same_per_module_flops():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(M, D, requires_grad=True)

    def body(m):
        model(x).backward()
        x.grad = None

    native_steps = run("native", body, model=model)
    assert merged(native_steps) == merged(run("dispatch", body, model=model))
    proj_input_grad = {"proj": 2 * mm(D, D)}  # x needs grad here: proj's input gradient too
    assert matmul_by(native_steps[-1], "backward") == {**expected_backward(), **proj_input_grad}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_phase_set_after_the_model_was_seen(backend):
    """Modules remember their model phase as of MODEL_PHASES.version: tagging a model that was
    already called (a trainer tags its reference model when training starts) takes effect."""
    torch.manual_seed(0)
    model, teacher, x = Net(), Net(), torch.randn(M, D)
    calls = {"n": 0}

    def body(m):
        if calls["n"] == 1:
            for module in teacher.modules():
                MODEL_PHASES.setdefault(module, "teacher")
        calls["n"] += 1
        with torch.no_grad():
            teacher(x)
        model(x).backward()

    steps = run(backend, body, model=model)
    assert matmul_by(steps[0], "no_grad_training") == expected_forward()  # not tagged yet
    assert matmul_by(steps[0], "teacher") == {}
    for flops in steps[1:]:
        assert matmul_by(flops, "teacher") == expected_forward()
        assert matmul_by(flops, "no_grad_training") == {}
        assert matmul_by(flops, "forward") == expected_forward()  # the student keeps its phase
        assert matmul_by(flops, "backward") == expected_backward()


class Flaky(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(D, D, bias=False)

    def forward(self, x):
        self.inner(x)
        raise ValueError("flaky")


class Guarded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flaky, self.fc = Flaky(), torch.nn.Linear(D, D, bias=False)

    def forward(self, x):
        try:
            self.flaky(x)
        except ValueError:
            pass
        return self.fc(x).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exception_inside_a_module_ends_its_call(backend):
    torch.manual_seed(0)
    model, x = Guarded(), torch.randn(M, D, requires_grad=True)

    def body(m):
        model(x).backward()
        x.grad = None

    for flops in run(backend, body, model=model):
        assert matmul_by(flops, "forward") == {"flaky.inner": mm(D, D), "fc": mm(D, D)}
        assert matmul_by(flops, "backward") == {"fc": 2 * mm(D, D)}


def test_a_meter_entered_inside_a_module_call():
    """The call that was open when the meter began ends with no frame of its own (the Python
    path's fallback on both backends): the same attribution either way, the FLOPs all there."""
    if native.load_error() is not None:
        pytest.skip(f"native backend unavailable: {native.load_error()}")
    torch.manual_seed(0)
    fc, head, x = torch.nn.Linear(D, D, bias=False), torch.nn.Linear(D, 1, bias=False), torch.randn(M, D)
    box = {}

    class Opens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = fc

        def forward(self, x):
            box["meter"] = flopcount.meter(backend=box["backend"], warn=False).__enter__()
            return self.fc(x)

    opens, steps = Opens(), {}
    for backend in ("dispatch", "native"):
        box["backend"] = backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = opens(x)
            head(y).sum().backward()
            m = box["meter"]
            m.step()
            m.__exit__(None, None, None)
        steps[backend] = dict(m.last_step.flops)
        fc.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
    assert merged([steps["native"]]) == merged([steps["dispatch"]])
    # Both are outermost modules to the meter (it began inside the call): named as roots.
    assert matmul_by(steps["native"], "forward") == {ROOT_MODULE: mm(D, D) + mm(D, 1)}
    backward = matmul_by(steps["native"], "backward")
    assert sum(backward.values()) == mm(D, D) + 2 * mm(D, 1)  # fc: weight gradient only


class Checkpointed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = MLP(), torch.nn.Linear(D, 1, bias=False)

    def forward(self, x):
        y = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.head(y).sum()


def test_checkpointed_recompute_keeps_its_modules():
    if native.load_error() is not None:
        pytest.skip(f"native backend unavailable: {native.load_error()}")
    torch.manual_seed(0)
    model, x = Checkpointed(), torch.randn(M, D, requires_grad=True)

    def body(m):
        model(x).backward()
        x.grad = None

    native_steps, dispatch_steps = run("native", body, model=model), run("dispatch", body, model=model)
    assert merged(native_steps) == merged(dispatch_steps)
    for flops in native_steps:
        assert matmul_by(flops, "forward") == {"block.up": mm(D, H), "block.down": mm(H, D), "head": mm(D, 1)}
        assert matmul_by(flops, "backward") == {"block.up": 2 * mm(D, H), "block.down": 2 * mm(H, D),
                                                "head": 2 * mm(D, 1)}
        # Non-reentrant checkpoint recomputes up to the last tensor backward needs: up (its
        # output feeds relu's backward), not down (nothing of its output is saved).
        assert matmul_by(flops, "recompute") == {"block.up": mm(D, H)}


@pytest.mark.skipif(native.load_error() is not None, reason="native backend unavailable")
def test_the_native_fast_path_is_given_back_when_the_meter_ends():
    model, x = Net(), torch.randn(M, D)
    with flopcount.meter(backend="native", warn=False) as m:
        model(x).backward()
        context = m.context
        assert type(context.__dict__["_module_pre"]).__name__ != "function"  # the extension's
        assert context.__dict__["_module_pre"] in MODULE_HOOKS.pres
    assert "_module_pre" not in context.__dict__ and "_module_post" not in context.__dict__
    assert all(getattr(pre, "__self__", None) is not context for pre in MODULE_HOOKS.pres)
    gone = weakref.ref(context)
    del m, context
    gc.collect()
    assert gone() is None  # the fast path held the Context: nothing keeps it now


def test_seen_modules_go_with_their_module_and_never_match_another():
    table = SeenModules()

    class Entry:
        def __init__(self, ref) -> None:
            self.ref = ref

    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    entry = table.add(a, Entry(table.ref(a)))
    assert table.get(a) is entry and table.get(b) is None
    table.by_id[id(b)] = entry  # as if b had reused a dead module's id
    assert table.get(b) is None
    del table.by_id[id(b)]
    del a
    gc.collect()
    assert table.by_id == {}


def test_muted_module_calls_are_seen_by_no_subscriber_on_that_thread_only():
    """MODULE_HOOKS.muted() hides the module calls of its own thread (flopcount's own model runs)
    while other threads' calls are still seen; the hooks read the thread's depth only while
    some block is open (``muting``), so it must be back to 0 after the blocks close."""
    import threading

    class Recorder:
        def __init__(self) -> None:
            self.pre, self.post = [], []
            self._module_pre = lambda module, args: self.pre.append(threading.get_ident())
            self._module_post = lambda module, args, output: self.post.append(threading.get_ident())

    recorder, layer, x = Recorder(), torch.nn.Linear(2, 2), torch.ones(1, 2)
    subscription = MODULE_HOOKS.subscribe(recorder)
    try:
        layer(x)
        with MODULE_HOOKS.muted():
            layer(x)
            other = threading.Thread(target=layer, args=(x,))
            other.start()
            other.join()
            with MODULE_HOOKS.muted():
                layer(x)
        layer(x)
    finally:
        subscription.remove()
    me = threading.get_ident()
    assert recorder.pre == [me, other.ident, me] and recorder.post == recorder.pre
    assert MODULE_HOOKS.muting == 0 and MODULE_HOOKS.local.muted == 0
