"""One error base with one class per kind: the command line maps them to exit codes by type,
and registering a second formula for an op raises unless overriding is asked for."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import flopcount
from flopcount import errors
from flopcount.budget import BudgetExceeded
from flopcount.capture.counter import UncountedOpError
from flopcount.cli import main
from flopcount.compliance.registry import UnknownBaseModel
from flopcount.formulas import REGISTRY
from flopcount.trace.storage import TraceError


def test_every_kind_is_a_flopcount_error_with_its_old_names_and_bases():
    assert UncountedOpError is errors.UncountedOpError is flopcount.UncountedOpError
    assert BudgetExceeded is errors.BudgetExceeded is flopcount.BudgetExceeded
    assert TraceError is errors.TraceError
    for kind, old_base in ((UncountedOpError, RuntimeError), (BudgetExceeded, RuntimeError),
                           (errors.BadInput, ValueError), (TraceError, ValueError), (UnknownBaseModel, ValueError),
                           (errors.DuplicateFormula, ValueError), (errors.IntegrityError, Exception)):
        assert issubclass(kind, errors.FlopcountError) and issubclass(kind, old_base), kind
    assert errors.exit_code(TraceError("flopcount: x")) == 2
    assert errors.exit_code(errors.IntegrityError("flopcount: x")) == 1
    assert errors.exit_code(UncountedOpError("x")) is None and errors.exit_code(ValueError("flopcount: x")) is None


def test_the_command_line_maps_by_type_not_by_message(capsys, monkeypatch):
    assert main(["models", "--json"]) == 0
    capsys.readouterr()
    from flopcount import cli

    def raises(error):
        def run(args):
            raise error
        return run

    monkeypatch.setitem(cli.COMMANDS, "models", (cli.COMMANDS["models"][0], cli.COMMANDS["models"][1],
                                                 raises(ValueError("flopcount: a bug that reads like input"))))
    with pytest.raises(ValueError, match="reads like input"):  # a plain ValueError is a bug: traceback
        main(["models"])
    monkeypatch.setitem(cli.COMMANDS, "models", (cli.COMMANDS["models"][0], cli.COMMANDS["models"][1],
                                                 raises(errors.BadInput("config x.json is not JSON"))))
    assert main(["models"]) == 2
    assert capsys.readouterr().err == "flopcount: config x.json is not JSON\n"


def test_the_former_flopcount_value_errors_are_bad_input():
    from flopcount.budget import budget_limit
    from flopcount.hardware import peak_flops_per_s

    with pytest.raises(errors.BadInput, match="flopcount: dtype 'fp4' is not one of fp32, tf32, bf16, fp16, fp8"):
        peak_flops_per_s("H100-SXM", "fp4")
    with pytest.raises(errors.BadInput, match="budget=-1"):
        budget_limit(-1, Fraction(10**23))


# ---- registering a formula twice -------------------------------------------------------------

@torch.library.custom_op("flopcount_errors::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def first(x_shape, *, out_shape):
    return x_shape[0]


def second(x_shape, *, out_shape):
    return 3 * x_shape[0]


def test_a_second_formula_for_an_op_raises_unless_override():
    op = torch.ops.flopcount_errors.twice.default
    try:
        flopcount.register_formula(twice, first, category="pointwise")
        flopcount.register_formula(op, first, category="pointwise")  # the same entry again: no change
        with pytest.raises(errors.DuplicateFormula, match=r"flopcount_errors\.twice already has a formula; "
                                                          r"pass override=True"):
            flopcount.register_formula(op, second, category="pointwise")
        with pytest.raises(errors.DuplicateFormula):
            flopcount.register_formula(twice, first, category="matmul")  # another category is another entry
        x = torch.randn(7)
        with flopcount.meter(backend="dispatch", warn=False) as m:
            twice(x)
        assert m.summary()["by_op"]["flopcount_errors.twice"]["flops"] == 7  # the first one stayed
        flopcount.register_formula(op, second, category="pointwise", override=True)
        with flopcount.meter(backend="dispatch", warn=False) as m:
            twice(x)
        assert m.summary()["by_op"]["flopcount_errors.twice"]["flops"] == 3 * 7
    finally:
        REGISTRY._table.pop(op, None)
        REGISTRY._cache.clear()
        REGISTRY.version += 1


def test_flopcounts_own_entries_are_not_replaced_silently():
    with pytest.raises(errors.DuplicateFormula, match="aten.mm already has a formula"):
        flopcount.register_formula(torch.ops.aten.mm.default, first, category="matmul")
    with pytest.raises(errors.DuplicateFormula, match="aten.view already has a known-zero entry"):
        flopcount.register_formula(torch.ops.aten.view, first, category="other")
