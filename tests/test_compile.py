"""torch.compile (CPU Inductor): compiled regions are counted from their aten graphs.

Inductor compiles slowly on 2 cores, so the models are tiny and each compiled model is reused
across the tests of this module (which run in file order). Expectations are closed forms
(docs/conventions.md): a Linear [N, i] -> [N, o] is 2*N*i*o forward and twice that backward;
causal fused attention is 2*P*(D_qk + D_v) forward with P = B*H*T(T+1)/2, twice that backward,
plus the recomputed score product 2*P*D_qk in phase recompute.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import flopcount

D, HEADS = 32, 4
GEMM = ("matmul", "attention", "conv")


class Block(nn.Module):
    """Pre-norm transformer block: causal SDPA attention and an MLP."""

    def __init__(self, d: int = D, heads: int = HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.silu(self.up(x)))


def expected_gemm(b: int, t: int, d: int = D, heads: int = HEADS) -> dict:
    """{(phase, category): flops} for one forward + backward of Block on [b, t, d]."""
    n, dh = b * t, d // heads
    linear = 2 * n * (d * 3 * d + d * d + d * 2 * d + 2 * d * d)
    pairs = b * heads * t * (t + 1) // 2
    attention = 2 * pairs * (dh + dh)
    return {("forward", "matmul"): linear, ("backward", "matmul"): 2 * linear,
            ("forward", "attention"): attention, ("backward", "attention"): 2 * attention,
            ("recompute", "attention"): 2 * pairs * dh}


def gemm(summary: dict) -> dict:
    return {(phase, cat): f for phase, cats in summary["by_phase_category"].items()
            for cat, f in cats.items() if cat in GEMM and f}


def train_step(model, x) -> dict:
    with flopcount.meter(backend="dispatch", warn=False) as m:
        model(x).sum().backward()
    return m.summary()


@pytest.fixture(scope="module")
def block():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Block()
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    x = torch.randn(2, 8, D)
    first = train_step(compiled, x)  # the first compiled call (compilation) inside the meter
    return model, compiled, first


def test_compiled_block_gemm_matches_eager_and_closed_form(block):
    model, _, first = block
    eager = train_step(model, torch.randn(2, 8, D))
    assert gemm(first) == gemm(eager) == expected_gemm(2, 8)
    assert first["uncounted_ops"] == {}
    # Module attribution inside the compiled region follows the graph's nn_module_stack: each
    # Linear's GEMMs land on the Linear, as in eager (where backward bookkeeping ops may join).
    n = 16
    linears = {"qkv": D * 3 * D, "o": D * D, "up": D * 2 * D, "down": 2 * D * D}
    for name, weights in linears.items():
        assert first["by_module"][name] >= 3 * 2 * n * weights
        assert eager["by_module"][name] >= 3 * 2 * n * weights
    assert first["by_module"]["qkv"] == 3 * 2 * n * D * 3 * D  # bias-free: GEMMs only


def test_meter_causes_no_graph_breaks_or_recompiles(block):
    _, compiled, _ = block
    assert dict(counters["graph_break"]) == {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_step(compiled, torch.randn(2, 8, D))  # warm call inside a meter
        compiled(torch.randn(2, 8, D)).sum().backward()  # and outside
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1


def test_warm_calls_are_counted_every_time(block):
    _, compiled, _ = block
    x = torch.randn(2, 8, D)
    with flopcount.meter(backend="dispatch", warn=False) as m:
        for _ in range(3):
            compiled(x).sum().backward()
            m.step()
    assert gemm(m.summary()) == {k: 3 * v for k, v in expected_gemm(2, 8).items()}
    assert m.summary()["steps"] == 3


def test_dynamic_shapes_second_batch_shape(block):
    _, compiled, _ = block
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph, symbolic sizes
        summary = train_step(compiled, torch.randn(3, 12, D))
    assert gemm(summary) == expected_gemm(3, 12)
    summary = train_step(compiled, torch.randn(2, 8, D))  # the first shape again (cached plan)
    assert gemm(summary) == expected_gemm(2, 8)


def test_native_backend_steps_aside_too(block):
    from flopcount.capture import native

    if native.load() is None:
        pytest.skip("native extension not available")
    _, compiled, _ = block
    with torch._dynamo.config.patch(error_on_recompile=True):
        with flopcount.meter(backend="native", warn=False) as m:
            compiled(torch.randn(2, 8, D)).sum().backward()
    assert gemm(m.summary()) == expected_gemm(2, 8)  # not twice: extern GEMMs are not re-counted


def test_eval_forward_is_eval(block):
    _, compiled, _ = block
    with torch.no_grad():
        with flopcount.meter(backend="dispatch", warn=False) as m:
            compiled(torch.randn(2, 8, D))
    forward = expected_gemm(2, 8)
    assert gemm(m.summary()) == {("eval", "matmul"): forward[("forward", "matmul")],
                                 ("eval", "attention"): forward[("forward", "attention")]}


def test_warm_cache_first_call_outside_the_meter(block):
    """After a reset, the same model compiles again from Inductor's warm FX-graph cache; its
    first call happens outside the meter, later calls are counted inside it."""
    model, _, _ = block
    torch._dynamo.reset()
    hits = counters["inductor"]["fxgraph_cache_hit"]
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    compiled(torch.randn(2, 8, D)).sum().backward()  # compiles, outside any meter
    assert counters["inductor"]["fxgraph_cache_hit"] >= hits + 2  # forward and backward graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        summary = train_step(compiled, torch.randn(3, 12, D))
    assert gemm(summary) == expected_gemm(3, 12)


# ---- activation checkpointing and a custom op inside a compiled region -------------------------
@torch.library.custom_op("flopcount_tests::scale", mutates_args=())
def scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * alpha


@scale.register_fake
def _(x, alpha):
    return torch.empty_like(x)


scale.register_autograd(lambda ctx, grad: (scale(grad, ctx.alpha), None),
                        setup_context=lambda ctx, inputs, output: setattr(ctx, "alpha", inputs[1]))


@flopcount.register_formula(scale, category="pointwise")
def scale_flops(x_shape, alpha, *, out_shape):
    return x_shape[0] * x_shape[1]


class MLP(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class CheckpointedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = MLP(), MLP()

    def forward(self, x):
        x = checkpoint(self.a, x, use_reentrant=False)
        return self.b(scale(x, 0.5))


def test_checkpointed_region_books_recompute_and_custom_op():
    torch.manual_seed(0)
    model = CheckpointedNet()
    x = torch.randn(8, 16)
    eager = train_step(model, x)
    compiled = train_step(torch.compile(model, fullgraph=True), x)
    n, d = 8, 16
    mlp = 2 * n * (d * 2 * d + 2 * d * d)
    # backward: weight and input gradients of every Linear, but x needs no gradient (a.up's input)
    training = {("forward", "matmul"): 2 * mlp, ("backward", "matmul"): 4 * mlp - 2 * n * d * 2 * d}
    assert {k: v for k, v in gemm(compiled).items() if k[0] != "recompute"} == training
    assert {k: v for k, v in gemm(eager).items() if k[0] != "recompute"} == training
    # Eager recomputes a.up only (what backward needs); the compiled backward recomputes the
    # checkpointed MLP that its partitioner chose to rematerialise: a.up, and a.down (whose
    # output feeds b.up's saved input). Either way it is booked as recompute, not training.
    assert gemm(eager)[("recompute", "matmul")] == 2 * n * d * 2 * d
    assert gemm(compiled)[("recompute", "matmul")] in (2 * n * d * 2 * d, mlp)
    # The custom op's formula counts its forward and its backward call, compiled as in eager.
    assert compiled["by_op"]["flopcount_tests.scale"]["flops"] == 2 * n * d
    assert eager["by_op"]["flopcount_tests.scale"]["flops"] == 2 * n * d
    assert compiled["training_flops"] - eager["training_flops"] == \
        sum(compiled["training_by_category"][c] - eager["training_by_category"][c]
            for c in ("pointwise", "norm", "reduction", "other"))


# ---- pure helpers: module names from nn_module_stack -----------------------------------------------
@pytest.mark.parametrize("expr, path", [
    ("L['self'].qkv", ["qkv"]),
    ("L['args'][0].model.layers.0.self_attn.q_proj", ["model", "layers", "0", "self_attn", "q_proj"]),
    ("L['self'].layers[3]._modules['mlp']", ["layers", "3", "mlp"]),
    ("G['model']", []),
    ("L['self'].blocks[", None),
])
def test_module_path(expr, path):
    from flopcount.capture.compile import module_path

    assert module_path(expr) == path


def test_join_module():
    from flopcount.capture.compile import join_module

    assert join_module("<root>", "mlp.up") == "mlp.up"
    assert join_module("<none>", "") == "<root>"  # a compiled module's own ops (module.compile())
    assert join_module("model.layers.0", "self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert join_module("model.layers.0", None) == "model.layers.0"


# ---- formulas that read integer inputs are evaluated on every call ---------------------------------
@torch.library.custom_op("flopcount_tests::segment_scale", mutates_args=())
def segment_scale(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Scales the rows offsets[0]:offsets[-1] of x (the rest is copied)."""
    out = x.clone()
    out[int(offsets[0]):int(offsets[-1])] *= 2
    return out


@segment_scale.register_fake
def _(x, offsets):
    return torch.empty_like(x)


@flopcount.register_formula(segment_scale, category="pointwise", needs_values=True)
def segment_scale_flops(x, offsets, *, out):
    return int(offsets[-1] - offsets[0]) * x.shape[1]


def test_value_dependent_formula_in_a_compiled_region():
    fn = torch.compile(lambda x, offsets: segment_scale(x, offsets) + 1, fullgraph=True)
    x = torch.randn(10, 3)
    flops = []
    for offsets in ([0, 4], [2, 9], [0, 4]):  # same shapes, different values
        with flopcount.meter(backend="dispatch", warn=False) as m:
            fn(x, torch.tensor(offsets))
        flops.append(m.summary()["by_op"]["flopcount_tests.segment_scale"]["flops"])
    assert flops == [4 * 3, 7 * 3, 4 * 3]


def _with_an_eager_part():
    """f(x, w) = sum((y @ y.T) @ y) with y = x @ w, whose middle product runs eagerly inside the
    compiled function (a frame Dynamo skips: eager ops while compiled code runs). A new function
    (code object) per call, so that each compiles afresh."""
    @torch.compiler.disable(recursive=False)
    def eager_part(y):
        return y @ y.T

    def f(x, w):
        y = x @ w
        return (eager_part(y) @ y).sum()

    return f


def test_dispatch_meter_counts_eager_ops_inside_compiled_code_without_dynamo_tracing_it():
    """The dispatch backend's __torch_dispatch__ runs while Dynamo's frame callback is set (the
    eager part): Dynamo must not trace it (capture/dispatch.py, _outside_dynamo). The meter's
    run compiles exactly the frames an unmetered run compiles, and every op is counted."""
    x, w = torch.randn(4, 8), torch.randn(8, 6)
    frames = counters["frames"]["total"]
    torch.compile(_with_an_eager_part(), backend="inductor")(x, w)
    unmetered_frames = counters["frames"]["total"] - frames
    compiled = torch.compile(_with_an_eager_part(), backend="inductor")
    frames = counters["frames"]["total"]
    with flopcount.meter(backend="dispatch", warn=False) as m:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                compiled(x, w)
                m.step()
    assert counters["frames"]["total"] - frames == unmetered_frames
    per_step = 2 * 4 * 8 * 6 + 2 * 4 * 6 * 4 + 2 * 4 * 4 * 6  # x @ w, y @ y.T, (y @ y.T) @ y
    summary = m.summary()
    assert summary["by_category"]["matmul"] == 3 * per_step and summary["steps"] == 3
    assert summary["by_op"]["aten.mm"]["calls"] == 9
