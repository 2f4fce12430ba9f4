"""Module tracking on the native backend's fast path (one call into the extension per module
call, which hooks the module's autograd node itself) and its repeated-step booking: the same
per-module FLOPs as the dispatch backend on every kind of module input and output, and closed
forms for the module attribution of a forward and backward."""
from __future__ import annotations

import collections
import warnings

import pytest
import torch

import flopcount
from flopcount.capture import native

pytestmark = pytest.mark.skipif(native.load_error() is not None,
                                reason=f"native backend unavailable: {native.load_error()}")


class Pair(torch.nn.Module):
    """Two outputs made by two autograd nodes: Python hooks them (torch's multi-grad hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x), self.b(x)


class Keyed(torch.nn.Module):
    """A plain dict output (one node per value)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, pair):
        return {"sum": self.proj(pair[0] + pair[1]), "n": 2}


class Output:
    """A model-output object that Python opens (to_tuple), as Hugging Face's ModelOutput."""

    def __init__(self, value) -> None:
        self.value = value

    def to_tuple(self):
        return (self.value,)


class Wrapped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, d):
        return Output(self.head(d["sum"]))


class Leaf(torch.nn.Module):
    """Returns a leaf tensor that requires grad (a parameter): Python hooks leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.bias


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair, self.keyed, self.wrapped, self.leaf = Pair(), Keyed(), Wrapped(), Leaf()

    def forward(self, x):
        out = self.wrapped(self.keyed(self.pair(x))).value
        return (out * self.leaf(x)).sum()


def _merged(flops: dict) -> dict:
    """A step's FLOPs with in-place op names merged: under a TorchDispatchMode autograd and the
    optimizer accumulate out of place (aten.add), natively in place (aten.add_); same FLOPs."""
    out: dict = {}
    for (phase, category, module, op), f in flops.items():
        key = (phase, category, module, op.rstrip("_"))
        out[key] = out.get(key, 0) + f
    return out


def _run(backend: str, steps: int = 3):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4, requires_grad=True)
    per_step = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(backend=backend, warn=False) as m:
            for _ in range(steps):
                model(x).backward()
                opt.step()
                opt.zero_grad()
                x.grad = None
                m.step()
                per_step.append(_merged(m.last_step.flops))
    return m.summary(), per_step


def test_every_kind_of_module_value_attributed_as_dispatch_does():
    dispatch, dispatch_steps = _run("dispatch")
    native_summary, native_steps = _run("native")
    assert native_summary["by_module"] == dispatch["by_module"]
    assert native_summary["by_phase_category"] == dispatch["by_phase_category"]
    assert native_summary["training_flops"] == dispatch["training_flops"]
    assert native_steps == dispatch_steps
    # Steps repeat: the native backend reuses the booked totals of the first steady step whole.
    assert native_steps[1] == native_steps[2]


def test_module_attribution_closed_form():
    """Linear(k, n) on [m, k] with grad: forward 2mkn (matmul) + mn (bias add); backward
    input and weight gradients 2 x 2mkn (matmul), attributed to the module whose backward ran."""
    m_, k, n = 5, 6, 7
    torch.manual_seed(0)
    outer = torch.nn.Sequential(torch.nn.Linear(k, n), torch.nn.Linear(n, 1))
    x = torch.randn(m_, k, requires_grad=True)
    with flopcount.meter(backend="native", warn=False) as meter:
        outer(x).sum().backward()
        meter.step()
    rows = {}
    for (phase, category, module, _), flops in meter.last_step.flops.items():
        rows[(phase, category, module)] = rows.get((phase, category, module), 0) + flops
    assert rows[("forward", "matmul", "0")] == 2 * m_ * k * n
    assert rows[("backward", "matmul", "0")] == 2 * (2 * m_ * k * n)
    assert rows[("forward", "matmul", "1")] == 2 * m_ * n * 1
    assert rows[("backward", "matmul", "1")] == 2 * (2 * m_ * n * 1)


@torch.library.custom_op("flopcount_native_module_tests::triple", mutates_args=())
def _triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


def test_repeated_steps_reuse_totals_until_the_registry_changes():
    """Steady steps book the same totals (reused whole); a formula registered mid-run drops the
    kept plans (the extension learns of it when the step closes), and the steps after count the
    newly covered op while the rest stays the same."""
    x = torch.randn(4, 4)
    steps = []
    with flopcount.meter(backend="native", warn=False) as m:
        for i in range(6):
            if i == 3:
                flopcount.register_formula(_triple, category="pointwise")(lambda x_shape, *, out_shape: 5 * x.numel())
            x @ x
            _triple(x)
            m.step()
            steps.append((sum(m.last_step.flops.values()), dict(m.last_step.uncounted)))
    mm = 2 * 4 ** 3
    assert steps[:3] == [(mm, {"flopcount_native_module_tests.triple": 1})] * 3
    assert steps[4:] == [(mm + 5 * 16, {})] * 2
    assert m.summary()["by_op"]["aten.mm"] == {"flops": 6 * mm, "calls": 6}


# ---- tensors from several autograd nodes: hooked in the extension, torch's multi-grad rule ----

class _Record(collections.OrderedDict):
    """A model output that is a dict subclass with dict's own values (Hugging Face's ModelOutput)."""


class _Hiding(dict):
    """A dict subclass whose values() hides its tensors: Python's rule reads values(), so the
    extension must leave it to Python."""

    def values(self):
        return []


class _Two(torch.nn.Module):
    """Outputs made by two nodes (entered at the first of them to run)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(k, n), torch.nn.Linear(k, n)

    def forward(self, x):
        return self.a(x), self.b(x)


class _Join(torch.nn.Module):
    """Inputs made by two nodes (left once every one of them that backward runs has run)."""

    def __init__(self, n: int, out) -> None:
        super().__init__()
        self.proj, self.out = torch.nn.Linear(n, n), out

    def forward(self, pair):
        return self.out(y=self.proj(pair[0] * pair[1]))


class _Multi(torch.nn.Module):
    def __init__(self, k: int, n: int, out) -> None:
        super().__init__()
        self.two, self.join = _Two(k, n), _Join(n, out)

    def forward(self, x):
        return self.join(self.two(x))


def _multi_run(backend: str, out, how: str, m_: int = 3, k: int = 5, n: int = 4):
    """One step of _Multi: ``how`` 'plain' (one backward), 'twice' (retain_graph, two backward
    calls on one graph) or 'partial' (backward(inputs=) reaching two.a only)."""
    torch.manual_seed(0)
    model = _Multi(k, n, out)
    x = torch.randn(m_, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(backend=backend, warn=False) as meter:
            loss = model(x)["y"].sum()
            if how == "twice":
                loss.backward(retain_graph=True)
                loss.backward()
            elif how == "partial":
                loss.backward(inputs=[model.two.a.weight])
            else:
                loss.backward()
            meter.step()
    rows: dict = {}
    for (phase, category, module, _), flops in meter.last_step.flops.items():
        rows[(phase, category, module)] = rows.get((phase, category, module), 0) + flops
    return rows


@pytest.mark.parametrize("how", ["plain", "twice", "partial"])
@pytest.mark.parametrize("out", [_Record, dict, _Hiding], ids=["dict_subclass", "dict", "values_overridden"])
def test_several_nodes_attributed_as_dispatch_does(how, out):
    assert _multi_run("native", out, how) == _multi_run("dispatch", out, how)


def test_several_nodes_closed_form_and_no_python_hooks(monkeypatch):
    """With outputs and inputs from two nodes and a dict-subclass output, Python places no
    gradient hook (Context._when_grads is not called once the modules are seen), and backward
    FLOPs land in the modules whose backward ran: proj's input and weight gradients 2 x 2mnn,
    the product's two gradients 2mn in join, each Linear's weight gradient 2mkn (x needs none)."""
    from flopcount.capture.context import Context

    m_, k, n = 3, 5, 4
    calls = []
    original = Context._when_grads
    monkeypatch.setattr(Context, "_when_grads", lambda self, *a: (calls.append(a[1]), original(self, *a))[1])
    torch.manual_seed(0)
    model = _Multi(k, n, _Record)
    x = torch.randn(m_, k)
    with flopcount.meter(backend="native", warn=False) as meter:
        for step in range(3):
            if step == 2:
                calls.clear()
            model(x)["y"].sum().backward()
            model.zero_grad()
            meter.step()
    assert calls == []
    rows: dict = {}
    for (phase, category, module, _), flops in meter.last_step.flops.items():
        rows[(phase, category, module)] = rows.get((phase, category, module), 0) + flops
    assert rows[("backward", "matmul", "join.proj")] == 2 * (2 * m_ * n * n)
    assert rows[("backward", "pointwise", "join")] == 2 * m_ * n
    assert rows[("backward", "matmul", "two.a")] == 2 * m_ * k * n
    assert rows[("backward", "matmul", "two.b")] == 2 * m_ * k * n


class _Scale(torch.nn.Module):
    """Linear(k, n) on its input (a leaf that requires grad, as the chain's or a checkpointed
    block's first input)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.proj(x)


def _leaf_run(backend: str, how: str, m_: int = 3, k: int = 5, n: int = 4, after_first=lambda: None):
    """Steps of Sequential(_Scale, Linear) whose input is a leaf: ``how`` 'plain' (one forward
    and backward a step), 'accumulate' (two forwards and backwards on the same leaf a step: the
    first's leaf hooks are still on it in the second) or 'twice' (retain_graph, two backward
    calls on one graph). Rows of the last step and the summary's by_module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Scale(k, n), torch.nn.Linear(n, 1))
    x = torch.randn(m_, k, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flopcount.meter(backend=backend, warn=False) as meter:
            for step in range(3):
                if step == 1:
                    after_first()  # the modules are seen: the fast path from here
                for _ in range(2 if how == "accumulate" else 1):
                    loss = model(x).sum()
                    if how == "twice":
                        loss.backward(retain_graph=True)
                    loss.backward()
                x.grad = None
                model.zero_grad()
                meter.step()
    rows: dict = {}
    for (phase, category, module, _), flops in meter.last_step.flops.items():
        rows[(phase, category, module)] = rows.get((phase, category, module), 0) + flops
    return rows, meter.summary()["by_module"]


@pytest.mark.parametrize("how", ["plain", "accumulate", "twice"])
def test_a_leaf_input_attributed_as_dispatch_does(how):
    assert _leaf_run("native", how) == _leaf_run("dispatch", how)


def test_a_leaf_input_closed_form_and_no_python_hooks(monkeypatch):
    """A module whose input is a leaf is hooked on the tensor in the extension: Python places no
    gradient hook, and backward FLOPs land in the modules whose backward ran: 0.proj's input and
    weight gradients 2 x 2mkn, 1's 2 x 2mn (its weight gradient and its input's)."""
    from flopcount.capture.context import Context

    m_, k, n = 3, 5, 4
    calls = []
    original = Context._when_grads
    monkeypatch.setattr(Context, "_when_grads", lambda self, *a: (calls.append(a[1]), original(self, *a))[1])
    rows, _ = _leaf_run("native", "plain", m_, k, n, after_first=calls.clear)
    assert calls == []
    assert rows[("backward", "matmul", "0.proj")] == 2 * (2 * m_ * k * n)
    assert rows[("backward", "matmul", "1")] == 2 * (2 * m_ * n * 1)
    assert rows[("forward", "matmul", "0.proj")] == 2 * m_ * k * n
