"""Module tracking on the native backend's fast path (one call into the extension per module
call, which hooks the module's autograd node itself) and its repeated-step booking: the same
per-module FLOPs as the dispatch backend on every kind of module input and output, and closed
forms for the module attribution of a forward and backward."""
from __future__ import annotations

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
