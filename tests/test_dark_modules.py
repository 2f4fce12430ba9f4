"""No silent zeros: modules whose forward did work no capture path saw are reported (capture/dark.py)."""
from __future__ import annotations

import pytest
import torch

import flopcount
from conftest import tiny_llama
from flopcount.conventions import NO_MODULE, ROOT_MODULE
from flopcount.trace.reader import read_table

NUMPY = f"{__name__}.NumpyLinear"


class NumpyLinear(torch.nn.Module):
    """A Linear computed in numpy: real work, invisible to the dispatcher and RecordFunction."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() @ self.weight.detach().numpy().T)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 8), NumpyLinear(8, 4))
        self.embed = torch.nn.Embedding(4, 2)

    def forward(self, x):
        return self.embed(self.layers(x).argmax(-1))  # an embedding lookup books nothing: not dark


def run(backend, out=None, strict=False):
    net = Net()
    with flopcount.meter(out, backend=backend, strict=strict, warn=False) as m:
        net(torch.randn(3, 8))
        m.step()
    return m


def test_numpy_module_is_dark(backend, tmp_path):
    m = run(backend, out=str(tmp_path / "trace"))
    s = m.summary()
    assert s["dark_modules"] == {"layers.1": NUMPY}
    assert s["uncounted_ops"] == {}
    assert s["by_module"]["layers.0"] == 2 * 3 * 8 * 8 + 3 * 8  # the ordinary Linear: counted, not dark
    assert "layers.1" not in s["by_module"]
    assert "1 module(s) with parameters booked no FLOPs" in s["method"]["uncertainty"]
    assert s["method"]["dark_modules"] == {"layers.1": NUMPY}
    # The traces: one breakdown row per dark module, summarize reads it back.
    rows = read_table(str(tmp_path / "trace"), "breakdown").to_pandas()
    dark = rows[rows["kind"] == "dark_module"]
    assert dark[["module", "op", "value"]].values.tolist() == [["layers.1", NUMPY, 1]]
    assert flopcount.summarize(str(tmp_path / "trace"))["dark_modules"] == {"layers.1": NUMPY}


def test_dark_module_in_reports(backend, tmp_path):
    from flopcount.report.text import summary_text

    run(backend, out=str(tmp_path / "trace"))
    s = flopcount.summarize(str(tmp_path / "trace"))
    assert f"dark modules      layers.1 ({NUMPY})" in summary_text(s)
    from flopcount.cli import main

    report = tmp_path / "report.md"
    assert main(["report", str(tmp_path / "trace"), "--format", "md", "-o", str(report)]) in (0, None)
    from flopcount.report.escape import markdown_text

    assert markdown_text(f"layers.1 ({NUMPY})") in report.read_text()  # escaped as every trace string is


def test_strict_mode_raises_for_dark_module(backend):
    with pytest.raises(flopcount.UncountedOpError, match=r"layers.1 \(.*NumpyLinear\)"):
        run(backend, strict=True)


def test_ordinary_training_has_no_dark_modules(backend):
    net = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))
    opt = torch.optim.AdamW(net.parameters())
    with flopcount.meter(backend=backend, strict=True) as m:  # strict: a dark module would raise
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        with torch.no_grad():
            net(input_ids=ids)
        m.step()
    assert m.summary()["dark_modules"] == {}


def test_bypassing_library_class_is_dark_even_with_flops(backend):
    """A class of a dispatcher-bypassing library (here named like apex's) that flopcount does not
    count at its API is reported, whatever aten work it also did."""
    fused = type("FusedLayerNorm", (torch.nn.LayerNorm,), {"__module__": "apex.normalization.fused_layer_norm"})
    net = torch.nn.Sequential(fused(8))
    with flopcount.meter(backend=backend, warn=False) as m:
        net(torch.randn(2, 8))
        m.step()
    s = m.summary()
    assert s["hardware_flops"] > 0
    assert s["dark_modules"] == {"0": "apex.normalization.fused_layer_norm.FusedLayerNorm"}


def test_dark_rule_is_by_name_prefix():
    from flopcount.capture.dark import dark_in_step

    ran = {"a": "A", "a.b": "B", "c": "C"}
    keys = [("forward", "matmul", "a.b.x", "aten.mm")]
    assert dark_in_step(ran, {}, keys) == {"c": "C"}  # a's submodule booked work: a is not dark
    assert dark_in_step(ran, {"t": "T"}, []) == {"a": "A", "a.b": "B", "c": "C", "t": "T"}


# ---- one model object reused as a submodule of a new wrapper (a new outermost module) -------------
M, D, OUT = 3, 8, 4  # rows, width, the numpy head's width


def linear_forward() -> int:
    """nn.Linear(D, D) on [M, D]: the product, then the bias add."""
    return 2 * M * D * D + M * D


def linear_backward() -> int:
    """Its weight gradient (a product) and bias gradient (a row sum): the input needs none."""
    return 2 * M * D * D + M * D


def train_then_wrap(backend, model, steps: int, fresh_wrapper: bool):
    """``steps`` times: train ``model`` alone (forward, backward), then run it under no_grad
    inside a wrapper with a numpy head (the wrapper is the outermost module of that call): one
    wrapper for all steps, or a new one each step (``fresh_wrapper``)."""
    torch.manual_seed(0)
    head, x = NumpyLinear(D, OUT), torch.randn(M, D)
    wrapper = torch.nn.Sequential(model, head)
    per_step = []
    with flopcount.meter(backend=backend, warn=False) as m:
        for _ in range(steps):
            model(x).sum().backward()  # the loss's sum runs outside every module
            model.zero_grad(set_to_none=True)
            m.step()
            per_step.append((dict(m.last_step.flops), dict(m.last_step.dark_modules)))
            with torch.no_grad():
                (torch.nn.Sequential(model, head) if fresh_wrapper else wrapper)(x)
            m.step()
            per_step.append((dict(m.last_step.flops), dict(m.last_step.dark_modules)))
    return m.summary(), per_step


def by_module(flops: dict) -> dict:
    out: dict = {}
    for (_, _, module, _), f in flops.items():
        out[module] = out.get(module, 0) + f
    return out


@pytest.mark.parametrize("fresh_wrapper", [False, True])
def test_a_trained_linear_reused_in_a_wrapper_names_the_wrappers_modules(backend, fresh_wrapper):
    """A bare Linear is the root while it trains, then ``0`` of the wrapper whose ``1`` is dark."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D, D)
    s, per_step = train_then_wrap(backend, model, steps=2, fresh_wrapper=fresh_wrapper)
    for train, wrapped in zip(per_step[::2], per_step[1::2]):
        assert train[1] == {}  # training: nothing dark
        assert by_module(train[0]) == {ROOT_MODULE: linear_forward() + linear_backward(), NO_MODULE: M * D}
        assert wrapped[1] == {"1": NUMPY}
        assert by_module(wrapped[0]) == {"0": linear_forward()}
    assert s["dark_modules"] == {"1": NUMPY}
    steps = 2
    assert s["by_module"] == {ROOT_MODULE: steps * (linear_forward() + linear_backward()),
                              NO_MODULE: steps * M * D, "0": steps * linear_forward()}
    assert s["hardware_flops"] == steps * (2 * linear_forward() + linear_backward() + M * D)


@pytest.mark.parametrize("fresh_wrapper", [False, True])
def test_a_trained_model_reused_in_a_wrapper_finds_the_wrappers_dark_module(backend, fresh_wrapper):
    """The model's own ``1`` (a Linear that books FLOPs) is ``0.1`` in the wrapper: the wrapper's
    numpy ``1`` is dark, not hidden behind the model's name."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Linear(D, D))
    s, per_step = train_then_wrap(backend, model, steps=2, fresh_wrapper=fresh_wrapper)
    for train, wrapped in zip(per_step[::2], per_step[1::2]):
        assert train[1] == {}
        assert by_module(train[0]) == {"0": linear_forward() + linear_backward(),
                                       "1": linear_forward() + 2 * (2 * M * D * D) + M * D,
                                       NO_MODULE: M * D}
        assert wrapped[1] == {"1": NUMPY}
        assert by_module(wrapped[0]) == {"0.0": linear_forward(), "0.1": linear_forward()}
    assert s["dark_modules"] == {"1": NUMPY}
    steps = 2
    assert s["by_module"] == {"0": steps * (linear_forward() + linear_backward()),
                              "1": steps * (linear_forward() + 2 * (2 * M * D * D) + M * D),
                              NO_MODULE: steps * M * D, "0.0": steps * linear_forward(), "0.1": steps * linear_forward()}
    assert s["hardware_flops"] == steps * (2 * linear_forward() + linear_backward() + 2 * (2 * M * D * D) + M * D
                                           + M * D + 2 * linear_forward())


def sgd_step(params: int) -> int:
    """Plain SGD: one multiply-add per parameter element (p -= lr * grad)."""
    return 2 * params


@pytest.mark.parametrize("reuse", ["same model", "another model"])
def test_modules_called_after_optimizer_step_belong_to_the_next_step(backend, reuse):
    """Automatic steps: optimizer.step() ends a step that closes at the next op with FLOPs, after
    the next call's first module hooks ran: those modules are the next step's, never dark in the
    one that closes (a bare Linear trained, then ``0`` of a wrapper, or of another model)."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(D, D), torch.randn(M, D)
    head = NumpyLinear(D, OUT)
    wrapper = torch.nn.Sequential(model if reuse == "same model" else torch.nn.Linear(D, D), head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 2
    with flopcount.meter(backend=backend, warn=False) as m:
        for _ in range(steps):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                wrapper(x)
    s = m.summary()
    assert s["dark_modules"] == {"1": NUMPY}
    assert s["steps"] == steps
    assert s["by_module"] == {ROOT_MODULE: steps * (linear_forward() + linear_backward()),
                              NO_MODULE: steps * (M * D + sgd_step(D * D + D)), "0": steps * linear_forward()}
    assert s["hardware_flops"] == steps * (2 * linear_forward() + linear_backward() + M * D + sgd_step(D * D + D))


class RenamedNumpyLinear(NumpyLinear):
    """The same module with its class swapped in place (as wrapper libraries do)."""


def test_a_loop_finds_the_dark_module_in_each_step(backend, tmp_path):
    """Every step of a loop reports its dark module, whichever way the module's calls are watched
    (the native backend's ModuleFastPath takes the calls after a module's first): steps with
    gradients, a step under no_grad (the Context's other frame for the module), a step after the
    module's class was swapped (reported under the new class), and steps with gradients again."""
    net = Net()
    kinds = ["grad", "grad", "no_grad", "grad", "swapped", "swapped", "grad"]
    with flopcount.meter(str(tmp_path / "trace"), backend=backend, warn=False) as m:
        per_step = []
        for kind in kinds:
            net.layers[1].__class__ = RenamedNumpyLinear if kind == "swapped" else NumpyLinear
            with torch.set_grad_enabled(kind != "no_grad"):
                net(torch.randn(3, 8))
            m.step()
            per_step.append(m.last_step.dark_modules)
    renamed = f"{__name__}.RenamedNumpyLinear"
    assert per_step == [{"layers.1": renamed if kind == "swapped" else NUMPY} for kind in kinds]
    rows = read_table(str(tmp_path / "trace"), "breakdown").to_pandas()
    dark = rows[rows["kind"] == "dark_module"].groupby(["module", "op"])["value"].sum().to_dict()
    assert dark == {("layers.1", NUMPY): kinds.count("grad") + kinds.count("no_grad"),
                    ("layers.1", renamed): kinds.count("swapped")}
