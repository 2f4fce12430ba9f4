"""The reference CPU training step that overhead figures are quoted on (issue: core engine).

Llama-style, vocab 8000, hidden 256, intermediate 688, 4 layers, 8 heads, batch 4 x 256 tokens,
sdpa attention, AdamW. Random weights from a config (FLOPs do not depend on weight values).
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 8000, 256, 688, 4, 8
BATCH, SEQ = 4, 256


def build(seed: int = 0):
    """(model, optimizer, input ids) for the reference step."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
        attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return model, optimizer, ids


def train_step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def metering(kind: str):
    """Context for one measured variant: 'baseline' (nothing), 'flopcountermode' (torch's
    counter), or a flopcount backend name ('dispatch', 'native')."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    import flopcount

    if kind == "baseline":
        return contextlib.nullcontext()
    if kind == "flopcountermode":
        return FlopCounterMode(display=False)
    return flopcount.meter(backend=kind, warn=False)


def count_ops(model, optimizer, ids) -> int:
    """aten ops the dispatcher sees in one step (what a per-op cost multiplies)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        train_step(model, optimizer, ids)
    return Count.n
