"""Formulas for the ops the architecture sweep found uncounted (tests/test_architecture_sweep.py):
triangular solves (lara_mini), complex rotary frequencies via polar (llama4, deepseek_v2) and
log-sigmoid (inkling_text). Closed forms computed here, under both capture backends."""
from __future__ import annotations

import pytest
import torch

import flopcount


def metered(backend, fn):
    with flopcount.meter(backend=backend, strict=True) as m:
        fn()
        m.step()
    return m.summary()


@pytest.mark.parametrize("left, unit", [(True, False), (False, False), (True, True)])
def test_solve_triangular_is_n_squared_per_right_hand_side(backend, left, unit):
    batch, n, k = 3, 5, 4
    a = torch.randn(batch, n, n).tril() + 4 * torch.eye(n)
    b = torch.randn(batch, n, k) if left else torch.randn(batch, k, n)
    s = metered(backend, lambda: torch.linalg.solve_triangular(a, b, upper=False, left=left, unitriangular=unit))
    # Substitution: n(n-1)/2 multiply-adds per right-hand side, plus n divisions unless unit.
    per_rhs = n * (n - 1) + (0 if unit else n)
    assert s["by_op"]["aten.linalg_solve_triangular"]["flops"] == batch * k * per_rhs
    assert s["by_category"]["other"] == batch * k * per_rhs


def test_solve_triangular_backward_counts_its_solves(backend):
    n, k = 4, 3
    a = (torch.randn(n, n).tril() + 4 * torch.eye(n)).requires_grad_()
    b = torch.randn(n, k, requires_grad=True)

    def step():
        torch.linalg.solve_triangular(a, b, upper=False).sum().backward()

    s = metered(backend, step)
    assert s["uncounted_ops"] == {}
    # Forward: one solve; backward: grad_B = A^-T g is one more solve of the same size.
    assert s["by_phase_category"]["forward"]["other"] == k * n * n
    assert s["by_phase_category"]["backward"]["other"] == k * n * n  # grad_A is an mm (matmul)


def test_polar_and_log_sigmoid(backend):
    r, theta = torch.rand(6, 7), torch.rand(6, 7)
    x = torch.randn(5, 3, requires_grad=True)

    def step():
        torch.polar(r, theta)
        torch.nn.functional.logsigmoid(x).sum().backward()

    s = metered(backend, step)
    assert s["uncounted_ops"] == {}
    ops = s["by_op"]
    assert ops["aten.polar"]["flops"] == 4 * 42  # cos, sin, two multiplies per element
    log_sigmoid = ops.get("aten.log_sigmoid_forward") or ops["aten.log_sigmoid"]
    assert log_sigmoid["flops"] == 5 * 15  # abs, exp, log1p, min, subtract
    assert ops["aten.log_sigmoid_backward"]["flops"] == 5 * 15  # sigmoid(-x) (4) times g
