"""Libraries counted at their Python API (integrations/kernels.py), against stand-ins: fake modules
installed in sys.modules under the real packages' names, whose kernels compute with numpy so that,
like the real CUDA/pybind kernels, no capture path sees them. Forward and backward land in their
phases and modules; the counted classes are not dark. Both capture backends."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import flopcount
from flopcount.formulas.constants import PER_ELEMENT


def c(name: str) -> int:
    return PER_ELEMENT[name].flops


_INSTALLED: list[str] = []  # stand-in module names, removed by the fixture


def install(name: str, **attrs) -> types.ModuleType:
    """A module named ``name`` (parents created) holding ``attrs``, removed by the fixture."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in sys.modules:
            sys.modules[prefix] = types.ModuleType(prefix)
            _INSTALLED.append(prefix)
    module = sys.modules[name]
    for key, value in attrs.items():
        if isinstance(value, type):
            value.__module__ = name
        setattr(module, key, value)
    return module


@pytest.fixture
def fake_modules():
    """Removes the stand-ins afterwards, and only them: dropping every module imported during a
    test would drop real ones too (Triton's, imported lazily), and importing a C extension's
    Python package a second time in one process aborts it (nanobind)."""
    yield
    while _INSTALLED:
        sys.modules.pop(_INSTALLED.pop(), None)


def np_(t):
    return t.detach().numpy()


class _NumpyLinear(torch.autograd.Function):
    """y = x W^T in numpy, gradients in numpy: invisible to the dispatcher."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.from_numpy(np_(x) @ np_(w).T)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.from_numpy(np_(g) @ np_(w)) if ctx.needs_input_grad[0] else None
        gw = torch.from_numpy(np_(g).reshape(-1, g.shape[-1]).T @ np_(x).reshape(-1, x.shape[-1]))
        return gx, gw


def te_linear_class():
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.in_features, self.out_features, self.use_bias = in_features, out_features, False
            self.weight = torch.nn.Parameter(torch.randn(out_features, in_features))

        def forward(self, inp):
            return _NumpyLinear.apply(inp, self.weight)

    return Linear


def test_te_linear_counted_in_forward_and_backward(fake_modules, backend):
    Linear = te_linear_class()
    install("transformer_engine.pytorch.module.linear", Linear=Linear)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), Linear(16, 24))
    x = torch.randn(2, 5, 16)
    with flopcount.meter(backend=backend, strict=True) as m:
        net(x).sum().backward()
        m.step()
    s = m.summary()
    tokens, gemm = 10, 2 * 10 * 16 * 24
    op = "transformer_engine.pytorch.module.linear.Linear"
    assert s["uncounted_ops"] == {} and s["dark_modules"] == {}
    assert s["by_op"][op] == {"flops": 3 * gemm, "calls": 2}  # forward; input + weight gradients
    assert s["by_phase_category"]["forward"]["matmul"] == gemm + 2 * tokens * 16 * 16
    assert s["by_module"]["1"] == 3 * gemm
    assert s["by_phase_category"]["backward"]["matmul"] == 2 * gemm + 2 * 2 * tokens * 16 * 16 - 2 * tokens * 16 * 16


def test_bypassing_class_without_formula_is_dark(fake_modules, backend):
    class Fp8Thing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight  # counted aten work, but its own kernels would be invisible

    install("transformer_engine.pytorch.fp8thing", Fp8Thing=Fp8Thing)
    net = torch.nn.Sequential(Fp8Thing())
    with flopcount.meter(backend=backend) as m:
        net(torch.ones(4))
        m.step()
    assert m.summary()["dark_modules"] == {"0": "transformer_engine.pytorch.fp8thing.Fp8Thing"}


class _NumpyDepthwiseConv(torch.autograd.Function):
    """Causal depthwise conv1d x [B, D, L] * w [D, W] in numpy (forward only needs to be right)."""

    @staticmethod
    def forward(ctx, x, w):
        xs, ws = np_(x), np_(w)
        width = ws.shape[1]
        padded = np.concatenate([np.zeros(xs.shape[:2] + (width - 1,), xs.dtype), xs], axis=2)
        out = sum(padded[:, :, j:j + xs.shape[2]] * ws[None, :, j:j + 1] for j in range(width))
        return torch.from_numpy(np.ascontiguousarray(out))

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), None


def test_causal_conv1d_fn_counted_wherever_imported(fake_modules, backend):
    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        return _NumpyDepthwiseConv.apply(x, weight)

    install("causal_conv1d.causal_conv1d_interface", causal_conv1d_fn=causal_conv1d_fn)
    user = install("my_mamba_like", causal_conv1d_fn=causal_conv1d_fn)  # from ... import causal_conv1d_fn
    b, d, length, width = 2, 6, 7, 4
    x = torch.randn(b, d, length, requires_grad=True)
    w = torch.randn(d, width)
    with flopcount.meter(backend=backend, strict=True) as m:
        user.causal_conv1d_fn(x, w, activation="silu").sum().backward()
        m.step()
    assert user.causal_conv1d_fn is causal_conv1d_fn  # restored when the meter exits
    s = m.summary()
    out = b * d * length
    assert s["by_phase_category"]["forward"]["conv"] == 2 * out * width
    assert s["by_phase_category"]["backward"]["conv"] == 2 * out * width  # input gradient only (w frozen)
    op = s["by_op"]["causal_conv1d.causal_conv1d_interface.causal_conv1d_fn"]
    assert op["flops"] == 4 * out * width + out * (c("silu") + c("silu_backward"))


def test_liger_rms_norm_function(fake_modules, backend):
    class LigerRMSNormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, eps=1e-6, offset=0.0, casting_mode="llama", in_place=False):
            xs = np_(x)
            return torch.from_numpy(xs / np.sqrt((xs * xs).mean(-1, keepdims=True) + eps) * np_(w))

        @staticmethod
        def backward(ctx, g):
            return torch.zeros_like(g), None, None, None, None, None

    install("liger_kernel.ops.rms_norm", LigerRMSNormFunction=LigerRMSNormFunction)
    x, w = torch.randn(3, 4, 32, requires_grad=True), torch.ones(32)
    with flopcount.meter(backend=backend, strict=True) as m:
        LigerRMSNormFunction.apply(x, w).sum().backward()
        m.step()
    assert "apply" not in LigerRMSNormFunction.__dict__  # restored
    s = m.summary()
    n = x.numel()
    assert s["by_phase_category"]["forward"]["norm"] == n * (c("rms_norm_forward") + 1)
    assert s["by_phase_category"]["backward"]["norm"] == n * (c("rms_norm_backward_input") + c("norm_backward_weight"))


def test_api_formulas_closed_forms():
    from flopcount.formulas import kernels_api as api

    t, h, f = 10, 16, 32
    forward, backward = api.te_layernorm_mlp(t, h, f, activation="swiglu", rms=True, bias=False)
    matmul = lambda works: sum(w.flops for w in works if w.category == "matmul")  # noqa: E731
    assert matmul(forward) == 2 * t * h * 2 * f + 2 * t * f * h
    assert matmul(backward) == 2 * matmul(forward)
    forward, backward = api.te_attention(2, 4, 8, 8, 16, 16, causal=True)
    pairs = 2 * 4 * 36
    assert forward[0].flops == 2 * pairs * 32 and backward[0].flops == 4 * pairs * 32
    assert backward[2] == ("attention", 2 * pairs * 16, "recompute")
    fwd, bwd = api.selective_scan(2, 8, 5, 4, has_d=True, has_z=False, delta_bias=False, delta_softplus=False)
    assert fwd[0].flops == 2 * 8 * 5 * (4 * c("selective_scan_step") + 2)
    fwd, bwd = api.liger_fused_linear_cross_entropy(t, h, 100, bias=False, weight_grad=False)
    assert matmul(fwd) == 2 * t * h * 100 and matmul(bwd) == 2 * t * h * 100


class _NumpyLoss(torch.autograd.Function):
    """A stand-in loss kernel over its first two tensors, in numpy: invisible to the dispatcher.
    Its gradient is a numpy array too, as Liger's precomputed gradients are."""

    @staticmethod
    def forward(ctx, x, y, *rest):
        ctx.shape = x.shape
        return torch.from_numpy(np.asarray((np.exp(np_(y)) * (np_(y) - np_(x))).sum(), dtype=np.float32))

    @staticmethod
    def backward(ctx, g):
        return (torch.from_numpy(np.zeros(ctx.shape, dtype=np.float32)), None) + (None,) * 8


def test_liger_jsd_and_kl_div_functions(fake_modules, backend):
    class LigerJSDFunction(_NumpyLoss):
        pass

    class LigerKLDivLossFunction(_NumpyLoss):
        pass

    install("liger_kernel.ops.jsd", LigerJSDFunction=LigerJSDFunction)
    install("liger_kernel.ops.kl_div", LigerKLDivLossFunction=LigerKLDivLossFunction)
    t, v = 6, 40
    x1, x2 = (torch.randn(t, v).log_softmax(-1).requires_grad_() for _ in range(2))  # two leaves: no grad accumulation
    y = torch.randn(t, v).log_softmax(-1)
    with flopcount.meter(backend=backend, strict=True) as m:
        LigerJSDFunction.apply(x1, y, None, 0.5, -100).backward()
        LigerKLDivLossFunction.apply(x2, y, "batchmean", True, 1e-10).backward()
        m.step()
    s = m.summary()
    n = t * v
    jsd = s["by_op"]["liger_kernel.ops.jsd.LigerJSDFunction.apply"]["flops"]
    kl = s["by_op"]["liger_kernel.ops.kl_div.LigerKLDivLossFunction.apply"]["flops"]
    # JSD: p, q (2 exp), the mixture (3), its log (1), two KL terms (2 x 3), add and sum (2) = 14,
    # the input gradient in the forward kernel (3); the backward scales it (1).
    assert jsd == n * (14 + 3) + n
    # KL: exp, log, subtract, multiply, sum (5); the gradient -y_true times g (3) in the backward.
    assert kl == 5 * n + 3 * n
    assert s["by_phase_category"]["forward"]["pointwise"] == n * 17 + 5 * n
    assert s["by_phase_category"]["backward"]["pointwise"] == n + 3 * n


def test_liger_fused_linear_jsd_function(fake_modules, backend):
    class LigerFusedLinearJSDFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None,
                    jsd_beta=0.5, ignore_index=-100, temperature=1.0):
            ctx.shapes = student_input.shape, student_weight.shape
            s_logits = np_(student_input) @ np_(student_weight).T
            t_logits = np_(teacher_input) @ np_(teacher_weight).T
            return torch.from_numpy(np.asarray(((s_logits - t_logits) ** 2).mean(), dtype=np.float32))

        @staticmethod
        def backward(ctx, g):
            x_shape, w_shape = ctx.shapes
            return (torch.from_numpy(np.zeros(x_shape, dtype=np.float32)),
                    torch.from_numpy(np.zeros(w_shape, dtype=np.float32)), None, None, None, None, None, None)

    install("liger_kernel.ops.fused_linear_jsd", LigerFusedLinearJSDFunction=LigerFusedLinearJSDFunction)
    t, hs, ht, v = 6, 8, 12, 40
    x = torch.randn(t, hs, requires_grad=True)
    w = torch.randn(v, hs, requires_grad=True)
    teacher_x, teacher_w = torch.randn(t, ht), torch.randn(v, ht)
    with flopcount.meter(backend=backend, strict=True) as m:
        LigerFusedLinearJSDFunction.apply(x, w, teacher_x, teacher_w, None, 0.5, -100, 2.0).backward()
        m.step()
    s = m.summary()
    n = t * v
    assert s["by_phase_category"]["forward"]["matmul"] == 2 * t * hs * v + 2 * t * ht * v  # student, teacher heads
    assert s["by_phase_category"]["backward"]["matmul"] == 2 * (2 * t * hs * v)  # input and weight gradients
    # each head's temperature divide and log-softmax, then the JSD and its gradient; backward scales it
    assert s["by_phase_category"]["forward"]["pointwise"] == 2 * n * (1 + c("_log_softmax")) + 17 * n
    assert s["by_phase_category"]["backward"]["pointwise"] == n


def test_module_watch_only_once_its_library_is_imported(fake_modules):
    """The watch of Transformer Engine's modules runs in every module call: a meter subscribes it
    only where transformer_engine is imported (no TE module can exist before)."""
    from flopcount.capture.context import MODULE_HOOKS
    from flopcount.integrations.kernels import _ModuleWatch

    def watches():
        return sum(isinstance(c, _ModuleWatch) for c in MODULE_HOOKS.contexts)

    assert "transformer_engine" not in sys.modules
    with flopcount.meter(backend="dispatch"):
        assert watches() == 0
    Linear = te_linear_class()
    install("transformer_engine.pytorch.module.linear", Linear=Linear)
    with flopcount.meter(backend="dispatch") as m:
        assert watches() == 1
        Linear(16, 24)(torch.randn(2, 16))
    assert m.summary()["by_op"]["transformer_engine.pytorch.module.linear.Linear"]["flops"] == 2 * 2 * 16 * 24
    assert watches() == 0
