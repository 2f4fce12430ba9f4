"""bitsandbytes on CPU (0.50): QLoRA (NF4 Linear4bit base + peft LoRA + AdamW8bit) metered exactly.

Closed forms (tiny Llama: hidden 64, 4 query heads and 2 KV heads of 16, MLP 96, vocab 128, 2
layers; B x S tokens T): every Linear of the decoder layers is an NF4 ``Linear4bit``; LoRA of rank
R on q_proj and v_proj. A frozen Linear in -> out costs 2·T·in·out forward and, when its input
requires grad, the same again for the input gradient (no weight gradient). Layer 0's input (the
frozen embedding) requires no grad, so layer 0's q/k/v projections have no backward GEMM; every
later input does (LoRA makes the hidden states require grad).
"""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import flopcount  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from flopcount.formulas.constants import PER_ELEMENT  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = 64, 4, 2, 16, 96, 128, 2
KV = KV_HEADS * HEAD_DIM
BATCH, SEQ, RANK = 2, 8, 8
T = BATCH * SEQ
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN)}
LORA = ("q_proj", "v_proj")
MIN_8BIT = 512  # AdamW8bit keeps smaller tensors in 32-bit state: both bnb update ops run


def c(name: str) -> int:
    return PER_ELEMENT[name].flops


def gemm(m, k, n) -> int:
    return 2 * m * k * n


def quantize_decoder(model) -> None:
    """Replace every nn.Linear of the decoder layers by an NF4 Linear4bit with the same weights."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.load_state_dict(linear.state_dict())
                setattr(parent, name, q.to("cpu"))  # .to() quantizes the weight


def qlora_model():
    model = tiny_llama()
    quantize_decoder(model)
    config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=list(LORA))
    return peft.get_peft_model(model, config)


def expected_gemm() -> dict[str, int]:
    """matmul FLOPs per phase, and attention per phase, from the shapes above."""
    forward = backward = 0
    for layer in range(LAYERS):
        for name, (i, o) in PROJ.items():
            input_grad = layer > 0 or name not in ("q_proj", "k_proj", "v_proj")
            forward += gemm(T, i, o)  # gemm_4bit
            backward += gemm(T, i, o) * input_grad  # dequantize_4bit + mm: input gradient only
            if name in LORA:
                forward += gemm(T, i, RANK) + gemm(T, RANK, o)
                # B: weight and input gradients; A: weight gradient, input gradient past layer 0
                backward += 2 * gemm(T, RANK, o) + gemm(T, i, RANK) * (1 + input_grad)
    forward += gemm(T, HIDDEN, VOCAB)  # lm_head (frozen)
    backward += gemm(T, HIDDEN, VOCAB)  # its input gradient
    # (the rotary table inv_freq [B, d/2, 1] @ positions [B, 1, S] has k = 1: torch runs it as a
    # broadcast multiply, pointwise work)
    pairs = BATCH * HEADS * SEQ * (SEQ + 1) // 2 * LAYERS  # causal SDPA, per query head
    attention_forward = 2 * pairs * (HEAD_DIM + HEAD_DIM)
    return {"matmul_forward": forward, "matmul_backward": backward,
            "attention_forward": attention_forward, "attention_backward": 2 * attention_forward,
            "attention_recompute": 2 * pairs * HEAD_DIM}


def trainable_elements(model) -> tuple[int, int]:
    """(elements in 8-bit state, elements in 32-bit state) under AdamW8bit(min_8bit_size=MIN_8BIT)."""
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(n for n in sizes if n >= MIN_8BIT), sum(n for n in sizes if n < MIN_8BIT)


def test_qlora_step_exact(backend):
    model = qlora_model()
    opt = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                              min_8bit_size=MIN_8BIT)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with flopcount.meter(backend=backend, strict=True) as m:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        m.step(tokens=T)
    s = m.summary()
    assert s["uncounted_ops"] == {}
    ops = s["by_op"]
    assert ops["bitsandbytes.gemm_4bit"]["calls"] == LAYERS * len(PROJ)
    assert ops["bitsandbytes.dequantize_4bit"]["calls"] == LAYERS * len(PROJ) - 3  # layer 0: no q/k/v grad
    expected = expected_gemm()
    phase_category = s["by_phase_category"]
    for key, flops in expected.items():
        category, phase = key.split("_")
        assert phase_category[phase].get(category, 0) == flops, key
    assert s["gemm_training_flops"] == sum(v for k, v in expected.items() if not k.endswith("recompute"))
    # Dequantization: each gemm_4bit reads every weight element once; so does each input-gradient dequantize.
    weights = sum(i * o for i, o in PROJ.values())
    assert ops["bitsandbytes.dequantize_4bit"]["flops"] == (LAYERS * weights - sum(
        i * o for n, (i, o) in PROJ.items() if n in ("q_proj", "k_proj", "v_proj"))) * c("dequantize_4bit")
    eight_bit, thirty_two_bit = trainable_elements(model)
    assert eight_bit and thirty_two_bit  # both update ops ran
    optimizer = (eight_bit + thirty_two_bit) * c("adam_step") + 2 * eight_bit * c("optimizer_8bit_state")
    assert s["by_phase"]["optimizer"] == optimizer
    assert ops["bitsandbytes.optimizer_update_8bit_blockwise"]["flops"] == eight_bit * (
        c("adam_step") + 2 * c("optimizer_8bit_state"))
    assert ops["bitsandbytes.optimizer_update_32bit"]["flops"] == thirty_two_bit * c("adam_step")


def test_quantize_dequantize_and_int8_ops(backend):
    """The functional API: quantize/dequantize (4-bit, blockwise 8-bit), int8 matmul and its
    dequantization, each against its closed form."""
    F = bnb.functional
    torch.manual_seed(0)
    a, w = torch.randn(6, 32), torch.randn(24, 32)
    with flopcount.meter(backend=backend, strict=True) as m:
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
        F.dequantize_4bit(packed, state)
        q8, state8 = F.quantize_blockwise(w)
        F.dequantize_blockwise(q8, state8)
        qa, sa, _ = F.int8_vectorwise_quant(a)
        qw, sw, _ = F.int8_vectorwise_quant(w)
        product = torch.ops.bitsandbytes.int8_linear_matmul(qa, qw)
        torch.ops.bitsandbytes.int8_mm_dequant(product, sa, sw)
        m.step()
    s = m.summary()
    assert s["uncounted_ops"] == {}
    ops = {k: v["flops"] for k, v in s["by_op"].items()}
    n = w.numel()
    assert ops["bitsandbytes.quantize_4bit"] == n * c("quantize_4bit")
    assert ops["bitsandbytes.dequantize_4bit"] == n * c("dequantize_4bit")
    assert ops["bitsandbytes.quantize_blockwise"] == n * c("quantize_blockwise")
    assert ops["bitsandbytes.dequantize_blockwise"] == n * c("dequantize_blockwise")
    assert ops["bitsandbytes.int8_vectorwise_quant"] == (a.numel() + n) * c("int8_vectorwise_quant")
    assert ops["bitsandbytes.int8_linear_matmul"] == gemm(6, 32, 24)
    assert ops["bitsandbytes.int8_mm_dequant"] == 6 * 24 * c("int8_mm_dequant")
    assert s["by_category"]["matmul"] == gemm(6, 32, 24)


def test_gemv_4bit_single_token(backend):
    """One token without grad takes bitsandbytes' gemv path: the same GEMM and dequantization."""
    layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    x = torch.randn(1, 1, 64)
    with torch.no_grad(), flopcount.meter(backend=backend, strict=True) as m:
        layer(x)
        m.step()
    s = m.summary()
    assert s["uncounted_ops"] == {}
    (op,) = [k for k in s["by_op"] if k.startswith("bitsandbytes.")]
    assert op in ("bitsandbytes.gemv_4bit", "bitsandbytes.gemm_4bit")
    assert s["by_category"]["matmul"] == gemm(1, 64, 48)
    assert s["by_category"]["pointwise"] == 64 * 48 * c("dequantize_4bit")
    assert s["by_phase"] == {"eval": gemm(1, 64, 48) + 64 * 48}


@pytest.mark.parametrize("name, per_element", [
    ("momentum", c("sgd_step") + c("sgd_momentum")),
    ("rmsprop", c("rmsprop_step")),
    ("lion", c("lion_step")),
    ("adagrad", c("adagrad_step")),
])
def test_bnb_update_per_element(name, per_element):
    from flopcount.formulas.bitsandbytes import update_per_element

    assert update_per_element(name) == per_element
    assert update_per_element(name, gnorm_scale=0.5) == per_element + c("grad_scale")
    assert update_per_element("lamb", max_unorm=1.0) == c("adam_step") + c("trust_ratio")
    assert update_per_element("momentum", weight_decay=0.1) == c("sgd_step") + c("sgd_momentum") + c(
        "sgd_weight_decay")


def test_registered_by_name_without_importing_bitsandbytes():
    """The formulas are in the registry by name and flopcount imports no bitsandbytes itself."""
    import subprocess
    import sys

    code = ("import sys, flopcount.formulas as f; "
            "assert 'bitsandbytes' not in sys.modules; "
            "assert 'bitsandbytes::gemm_4bit' in dict(f.REGISTRY.items()); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
