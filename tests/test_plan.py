"""flopcount plan: the planned step (meta device) equals a real metered CPU step exactly, and at
published shapes its GEMM work equals closed forms written here (not derived from the code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import flopcount

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
CONFIGS = {
    "llama": dict(model_type="llama", **TINY),
    "llama_mha": dict(model_type="llama", **{**TINY, "num_key_value_heads": 4}),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **TINY),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      head_dim=16, **TINY),
}


def metered_cpu_step(values: dict, *, seq: int, batch: int, grad_accum: int = 1, lora_rank=None,
                     targets=("q_proj", "v_proj"), checkpointing=False, optimizer="adamw", attn="sdpa"):
    """A real training step on CPU with real (random) weights, metered: what a user would run."""
    values = dict(values)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_rank:
            model.enable_input_require_grads()
    if lora_rank:
        # QLoRA's 4-bit base Linear is planned as this frozen Linear (same GEMMs).
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                           target_modules=list(targets)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-4),
           "sgd": lambda: torch.optim.SGD(params, lr=1e-4, momentum=0.9),
           "adafactor": lambda: torch.optim.Adafactor(params, lr=1e-2)}[optimizer]()
    ids = torch.randint(0, values["vocab_size"], (batch, seq))
    with flopcount.meter(None, backend="dispatch", energy=False) as m:
        for _ in range(grad_accum):
            loss = model(input_ids=ids, labels=ids).loss
            (loss / grad_accum).backward() if grad_accum > 1 else loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.step(tokens=batch * seq * grad_accum)
    return m.summary()


def same_step(planned: dict, metered: dict) -> None:
    for key in ("training_flops", "hardware_flops", "by_phase", "by_category", "tokens", "uncounted_ops"):
        assert planned[key] == metered[key], key
    assert metered["by_category"]["matmul"] > 0


CASES = {
    "dense_gqa": dict(config="llama"),
    "dense_mha_eager": dict(config="llama_mha", attn="eager"),
    "lora": dict(config="llama", lora_rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "qlora": dict(config="llama", lora_rank=4, qlora=True),
    "checkpointing_lora_accum": dict(config="llama", lora_rank=4, checkpointing=True, grad_accum=2),
    "checkpointing_full_sgd": dict(config="llama", checkpointing=True, optimizer="sgd"),
    "moe_mixtral": dict(config="mixtral"),
    "moe_qwen3_lora_adafactor": dict(config="qwen3_moe", lora_rank=4, optimizer="adafactor"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_step_equals_metered_cpu_step(case):
    c = dict(CASES[case])
    values = CONFIGS[c.pop("config")]
    qlora = c.pop("qlora", False)
    seq, batch = 16, 2
    metered = metered_cpu_step(values, seq=seq, batch=batch, **c)
    planned = flopcount.plan(values, seq_len=seq, batch_size=batch, steps=10, grad_accum=c.get("grad_accum", 1),
                             lora_rank=c.get("lora_rank"), lora_targets=c.get("targets", ("q_proj", "v_proj")),
                             qlora=qlora, gradient_checkpointing=c.get("checkpointing", False),
                             optimizer=c.get("optimizer", "adamw"), attn=c.get("attn", "sdpa"))
    same_step(planned["per_step"], metered)
    assert planned["training_flops"] == 10 * metered["training_flops"]
    if c.get("checkpointing"):
        assert metered["by_phase"].get("recompute", 0) > 0
    if c.get("attn", "sdpa") == "sdpa":
        assert metered["by_category"]["attention"] > 0  # the fused kernel, on both sides


# ---- published shapes: GEMM work against closed forms written here ---------------------------

LLAMA_3_1_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                    max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"})
MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=32768,
                    rope_theta=1e6)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flopcount.cli", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=600)


def planned_json(tmp_path, values, *args):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    done = run_cli("--config", str(path), *args, "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def attention_closed_form(layers, heads, head_dim, seq, batch=1):
    """Causal fused attention: P = S(S+1)/2 unmasked pairs; forward 2·P·(D_qk + D_v) per head,
    backward 2x that, recompute of the scores 0.5x (all in category attention)."""
    pairs = seq * (seq + 1) // 2
    forward = 2 * pairs * (head_dim + head_dim) * heads * batch * layers
    return forward, 2 * forward, forward // 2


def by_phase_category(summary, phase, category):
    return summary["by_phase_category"].get(phase, {}).get(category, 0)


def test_llama_3_1_8b_full_and_lora_gemm_work_equals_closed_form(tmp_path):
    # (The rotary embedding's inv_freq @ positions has an inner dimension of 1: torch runs it as
    # an elementwise product, not a GEMM, so it is no matmul work.)
    seq, d, inter, layers, heads, kv, hd, vocab = 2048, 4096, 14336, 32, 32, 8, 128, 128256
    # Weights (d_in x d_out) of every Linear in one layer: q, k, v, o, gate, up, down.
    per_layer = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, inter), (d, inter), (inter, d)]
    w = layers * sum(a * b for a, b in per_layer) + d * vocab  # + lm_head
    full = planned_json(tmp_path, LLAMA_3_1_8B, "--seq-len", str(seq), "--batch-size", "1", "--steps", "1")
    step = full["per_step"]
    assert by_phase_category(step, "forward", "matmul") == 2 * seq * w
    assert by_phase_category(step, "backward", "matmul") == 4 * seq * w  # input and weight gradients
    fwd, bwd, rec = attention_closed_form(layers, heads, hd, seq)
    assert by_phase_category(step, "forward", "attention") == fwd
    assert by_phase_category(step, "backward", "attention") == bwd
    assert by_phase_category(step, "recompute", "attention") == rec
    assert full["parameters"] == w + vocab * d + layers * 2 * d + d  # + embedding, norms
    assert full["trainable_parameters"] == full["parameters"]

    r = 16
    lora = planned_json(tmp_path, LLAMA_3_1_8B, "--seq-len", str(seq), "--batch-size", "1", "--steps", "1",
                        "--lora-rank", str(r), "--lora-targets", "q_proj,v_proj")
    step = lora["per_step"]
    qv = [(d, heads * hd), (d, kv * hd)]
    adapters = layers * sum(a * r + r * b for a, b in qv)
    assert by_phase_category(step, "forward", "matmul") == 2 * seq * (w + adapters)
    # Frozen weights: no weight gradients, only input gradients, and none at all for layer 0's
    # q, k, v (their input, the embedding output, needs no gradient). Adapters: B gets weight and
    # input gradients, A its weight gradient and, above layer 0, its input gradient.
    first_qkv = sum(a * b for a, b in per_layer[:3])
    base_input_grads = 2 * seq * (w - first_qkv)
    adapter_grads = 2 * seq * (layers * sum(2 * r * b + a * r for a, b in qv) + (layers - 1) * sum(a * r for a, b in qv))
    assert by_phase_category(step, "backward", "matmul") == base_input_grads + adapter_grads
    assert lora["trainable_parameters"] == adapters
    assert by_phase_category(step, "forward", "attention") == fwd


def test_mixtral_8x7b_gemm_work_equals_closed_form(tmp_path):
    seq, d, inter, layers, heads, kv, hd, vocab, experts, top_k = 2048, 4096, 14336, 32, 32, 8, 128, 32000, 8, 2
    attention_proj = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    router = d * experts
    # Each token goes to top_k experts; each expert is w1, w3 (d x inter) and w2 (inter x d).
    expert_work_per_token = top_k * 3 * d * inter
    w = layers * (attention_proj + router) + d * vocab
    plan = planned_json(tmp_path, MIXTRAL_8X7B, "--seq-len", str(seq), "--batch-size", "1", "--steps", "1")
    step = plan["per_step"]
    forward = 2 * seq * (w + layers * expert_work_per_token)
    assert by_phase_category(step, "forward", "matmul") == forward
    assert by_phase_category(step, "backward", "matmul") == 2 * forward
    fwd, bwd, rec = attention_closed_form(layers, heads, hd, seq)
    assert by_phase_category(step, "forward", "attention") == fwd
    assert by_phase_category(step, "recompute", "attention") == rec
    # All 8 experts' weights are parameters; 6·N·D overstates the count (only top-2 run).
    assert plan["parameters"] == w + layers * experts * 3 * d * inter + vocab * d + layers * 2 * d + d
    assert plan["formulas"]["6ND"]["deviation"] > 1.5
