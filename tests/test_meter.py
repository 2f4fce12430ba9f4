"""Meter semantics: phases, checkpointing, steps, modules, nesting, and a Llama step vs closed form."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import flopcount
from flopcount.formulas.constants import PER_ELEMENT
from conftest import tiny_llama

B, D, H = 8, 16, 32  # batch, model width, hidden width of the MLP below


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(D, H, bias=False)
        self.down = torch.nn.Linear(H, D, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


GEMM = 2 * B * D * H  # one of the two Linear layers, forward


def mm_by_phase(summary):
    return {p: cats.get("matmul", 0) for p, cats in summary["by_phase_category"].items()}


def test_phases_of_a_training_step(backend):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, D)  # input needs no grad: the first layer has no input-gradient GEMM
    with flopcount.meter(backend=backend) as m:
        model(x).sum().backward()
        opt.step()
        with torch.no_grad():
            model(x)
    s = m.summary()
    assert mm_by_phase(s) == {"forward": 2 * GEMM, "backward": 3 * GEMM, "eval": 2 * GEMM, "optimizer": 0}
    n_params = 2 * D * H
    assert s["by_phase"]["optimizer"] == PER_ELEMENT["sgd_step"].flops * n_params
    assert s["training_flops"] == s["hardware_flops"] - s["by_phase"]["eval"]
    assert s["uncounted_ops"] == {}


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_books_recompute(backend, reentrant):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(B, D, requires_grad=True)
    with flopcount.meter(backend=backend) as m:
        checkpoint(model, x, use_reentrant=reentrant).sum().backward()
    s = mm_by_phase(m.summary())
    assert s["forward"] == 2 * GEMM  # reentrant's first forward runs under no_grad: still forward
    assert s["backward"] == 4 * GEMM
    # Reentrant re-runs the whole forward; non-reentrant stops once backward has what it needs:
    # `down`'s output is never needed, so only `up` (and relu) are recomputed.
    assert s["recompute"] == (2 * GEMM if reentrant else GEMM)
    assert m.summary()["training_flops"] == m.summary()["hardware_flops"] - sum(
        m.summary()["by_phase_category"]["recompute"].values())


def test_hf_gradient_checkpointing_counts_recompute_not_eval(backend):
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    with flopcount.meter(backend=backend) as m:
        model(input_ids=ids, labels=ids).loss.backward()
    s = m.summary()
    assert "eval" not in s["by_phase"]
    assert s["by_phase_category"]["recompute"]["matmul"] > 0


def test_user_phases(backend):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(B, D)
    with flopcount.meter(backend=backend) as m:
        with m.phase("generation"), torch.no_grad():
            model(x)
        with m.phase("scoring", training=False):
            model(x)
        model(x).sum().backward()
    s = m.summary()
    assert mm_by_phase(s) == {"generation": 2 * GEMM, "scoring": 2 * GEMM, "forward": 2 * GEMM, "backward": 3 * GEMM}
    assert s["training_flops"] == s["hardware_flops"] - s["by_phase"]["scoring"]
    assert "generation" in s["training_phases"] and "scoring" in s["excluded_phases"]
    with flopcount.meter(backend=backend) as m2:
        with pytest.raises(ValueError, match="backward"):
            with m2.phase("backward"):
                pass
        with m2.phase("gen"):
            pass
        with pytest.raises(ValueError, match="already used"):
            with m2.phase("gen", training=False):
                pass


def test_modules_forward_and_backward_attribution(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(MLP(), torch.nn.Linear(D, 4))
    x = torch.randn(B, D, requires_grad=True)
    with flopcount.meter(backend=backend) as m:
        model(x).sum().backward()
    mods = m.summary()["by_module"]
    assert mods["0.up"] == 3 * GEMM  # forward, input gradient, weight gradient
    assert mods["0.down"] == 3 * GEMM
    # relu and its gradient run in the MLP's own forward/backward, not in `up` or `down`.
    assert mods["0"] == (PER_ELEMENT["relu"].flops + PER_ELEMENT["threshold_backward"].flops) * B * H
    head = 2 * B * D * 4
    assert mods["1"] == 3 * head + B * 4 + B * 4  # + bias add (forward) and bias gradient (sum over batch)
    assert mods["<none>"] == B * 4  # the .sum() outside the model
    model.zero_grad(set_to_none=True)
    x.grad = None  # otherwise the second backward accumulates into existing gradients (more adds)
    with flopcount.meter(backend=backend, module_depth=1) as m:
        model(x).sum().backward()
    assert set(m.summary()["by_module"]) <= {"0", "1", "<root>", "<none>"}
    assert m.summary()["by_module"]["0"] == mods["0"] + mods["0.up"] + mods["0.down"]


def test_backward_of_an_earlier_meters_graph(backend):
    """A graph built under one meter and run backward under the next: the first meter's gradient
    hooks end with it (the native ones are C++ hooks that check their meter), so the second books
    the whole backward outside any module, under both backends."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(MLP(), torch.nn.Linear(D, 4))
    x = torch.randn(B, D, requires_grad=True)
    with flopcount.meter(backend=backend):
        loss = model(x).sum()
    with flopcount.meter(backend=backend) as m:
        loss.backward()
    head = 2 * B * D * 4
    # up and down: input and weight gradients; relu's gradient; head: both gradients and the bias's.
    backward = 2 * GEMM + 2 * GEMM + PER_ELEMENT["threshold_backward"].flops * B * H + 2 * head + B * 4
    assert m.summary()["by_module"] == {"<none>": backward}


class Pair(torch.nn.Module):
    """Two inputs made by different autograd nodes (or leaves): the multi-tensor hook path."""

    def __init__(self):
        super().__init__()
        self.left = torch.nn.Linear(D, D, bias=False)
        self.right = torch.nn.Linear(D, D, bias=False)

    def forward(self, a, b):
        return self.left(a) * self.right(b)


def test_module_attribution_with_leaf_and_several_inputs(backend):
    torch.manual_seed(0)
    model = Pair()
    prompt = torch.randn(B, D, requires_grad=True)  # a leaf fed every step (a soft prompt)
    square = 2 * B * D * D
    mul = PER_ELEMENT["mul"].flops * B * D
    with flopcount.meter(backend=backend) as m:
        for _ in range(3):
            made = torch.randn(B, D, requires_grad=True) * 2  # the other input: a non-leaf
            model(prompt, made).sum().backward()
            prompt.grad = None  # no gradient accumulation: each step books the same work
            model.zero_grad(set_to_none=True)
            record = m.step()
            by_module = {}
            for (_, _, module, _), flops in record.flops.items():
                by_module[module] = by_module.get(module, 0) + flops
            assert by_module["left"] == 3 * square  # forward, input gradient, weight gradient
            assert by_module["right"] == 3 * square
            # Pair's own product and both halves of its gradient, outside left and right.
            assert by_module["<root>"] == 3 * mul
            # Gradient hooks on the leaf are gone once the step closes: nothing piles up on it.
            assert not prompt._backward_hooks


def test_automatic_steps_and_explicit_steps(backend):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(B, D)
    per_step = 2 * GEMM + 3 * GEMM + (PER_ELEMENT["relu"].flops + PER_ELEMENT["threshold_backward"].flops) * B * H \
        + B * D + 2 * (2 * D * H)  # forward, backward, relu, loss sum, SGD (lr * grad, subtract) per parameter
    with flopcount.meter(backend=backend) as m:
        for i in range(3):
            out = model(x)
            # Live totals: the previous step closed as this one began (by its first module call).
            assert (m.step_index, m.training_flops) == (i, i * per_step)
            out.sum().backward()
            opt.step()
            opt.zero_grad()
    s = m.summary()
    assert (s["steps"], s["training_flops"], m.last_step.training_flops) == (3, 3 * per_step, per_step)
    with flopcount.meter(backend=backend) as m:
        for i in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            m.step(tokens=torch.tensor(B * 10), samples=B)
    s = m.summary()
    assert (s["steps"], s["tokens"], s["samples"], s["training_flops"]) == (2, 2 * B * 10, 2 * B, 2 * per_step)
    with flopcount.meter(backend=backend) as m:
        with pytest.raises(ValueError, match="tokens"):
            m.step(tokens=2.5)


def test_nested_meters_each_count_their_block(backend):
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with flopcount.meter(backend=backend) as outer:
        a @ b
        with flopcount.meter(backend=backend) as inner:
            a @ b
    assert inner.summary()["hardware_flops"] == 2 * 4 * 5 * 6
    assert outer.summary()["hardware_flops"] == 2 * inner.summary()["hardware_flops"]


def test_ops_in_threads_the_program_starts_are_not_seen(backend):
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with flopcount.meter(backend=backend) as m:
        worker = threading.Thread(target=lambda: a @ b)
        worker.start()
        worker.join()
        a @ b
    assert m.summary()["hardware_flops"] == 2 * 4 * 5 * 6


def test_meter_misuse_gives_clear_errors():
    with pytest.raises(ValueError, match="backend='gpu'"):
        flopcount.meter(backend="gpu")
    with pytest.raises(RuntimeError, match="inside `with meter:`"):
        flopcount.meter().step()


# ---- a tiny Hugging Face Llama step against the closed form ------------------------------------

def llama_step_closed_form(cfg, batch, seq):
    """Matmul and attention FLOPs of one training step (forward, backward) of LlamaForCausalLM,
    every parameter trainable, causal SDPA. Written from the architecture, not from the code."""
    t = batch * seq
    h, i, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    per_layer = 2 * t * (h * h + 2 * h * kv + h * h + 3 * h * i)   # q, k, v, o, gate, up, down
    forward_mm = layers * per_layer + 2 * t * h * vocab               # + lm_head
    pairs = batch * cfg.num_attention_heads * seq * (seq + 1) // 2    # causal, per layer
    attention_fwd = layers * 2 * pairs * (hd + hd)
    return {"matmul": 3 * forward_mm, "attention": 3 * attention_fwd,  # backward = 2x forward
            "recompute_attention": layers * 2 * pairs * hd}


@pytest.mark.parametrize("autocast", [False, True])
def test_llama_training_step_matches_closed_form(backend, autocast):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, seq = 2, 24
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with flopcount.meter(backend=backend, strict=True) as m:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        m.step(tokens=ids.numel())
    s = m.summary()
    expected = llama_step_closed_form(model.config, batch, seq)
    assert s["uncounted_ops"] == {}
    assert s["training_by_category"]["matmul"] == expected["matmul"]
    assert s["training_by_category"]["attention"] == expected["attention"]
    assert s["by_phase_category"]["recompute"]["attention"] == expected["recompute_attention"]
    assert s["by_phase"]["optimizer"] > 0 and s["by_category"]["norm"] == 0  # HF RMSNorm is eager pointwise


def test_agrees_with_flopcountermode_on_matmul_ops(backend):
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama()
    model.config._attn_implementation = "eager"  # FlopCounterMode counts 0 for CPU flash attention
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with FlopCounterMode(display=False) as fcm:
        model(input_ids=ids, labels=ids).loss.backward()
    aten = torch.ops.aten
    theirs = sum(fcm.get_flop_counts()["Global"].get(op, 0) for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm))
    with flopcount.meter(backend=backend) as m:
        model(input_ids=ids, labels=ids).loss.backward()
    assert m.summary()["by_category"]["matmul"] == theirs > 0
