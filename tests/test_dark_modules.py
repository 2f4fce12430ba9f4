"""No silent zeros: modules whose forward did work no capture path saw are reported (capture/dark.py)."""
from __future__ import annotations

import pytest
import torch

import flopcount
from conftest import tiny_llama
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
