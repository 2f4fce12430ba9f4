"""Every aten op that a fine-tuning step of the common decoder families runs has a formula or is
known-zero (strict mode raises otherwise), in fp32 and under bf16 autocast, with fused and
foreach AdamW, padding masks, dropout and activation checkpointing."""
from __future__ import annotations

import pytest
import torch

import flopcount


def configs():
    import transformers as T

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": T.LlamaConfig(**common),
        "qwen2": T.Qwen2Config(**common),
        "mistral": T.MistralConfig(**common, sliding_window=8),
        "mixtral": T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "gpt2": T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "mixtral", "gpt2"])
def test_training_step_has_no_uncounted_ops(backend, family):
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(configs()[family])
    model.train()
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a real attention mask (not just is_causal)
    with flopcount.meter(backend=backend, strict=True) as m:
        for fused, autocast, ckpt in ((False, False, False), (True, True, True)):
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model(input_ids=ids)
    s = m.summary()
    assert s["uncounted_ops"] == {}
    assert s["training_by_category"]["matmul"] > 0 and s["by_phase"]["optimizer"] > 0 and s["by_phase"]["eval"] > 0
