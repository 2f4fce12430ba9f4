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


# The twin: the same modules, parameters and op sequence with tiny widths, so that its compute is
# negligible and a meter's fixed cost per step (hooks, per-op capture, booking) shows almost
# without noise. Head size 2 keeps the 8 heads.
TWIN = dict(vocab=64, hidden=16, intermediate=16, batch=1, seq=8)


def build(seed: int = 0, twin: bool = False):
    """(model, optimizer, input ids) for the reference step, or for its tiny twin."""
    import transformers

    vocab, hidden, intermediate, batch, seq = (
        (TWIN["vocab"], TWIN["hidden"], TWIN["intermediate"], TWIN["batch"], TWIN["seq"]) if twin
        else (VOCAB, HIDDEN, INTERMEDIATE, BATCH, SEQ))
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=seq,
        attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return model, optimizer, ids


def train_step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def metering(kind: str):
    """Context for one measured variant: 'baseline' (nothing), 'flopcountermode' (torch's
    counter), a flopcount backend name ('dispatch', 'native'), 'native_untracked' (native with
    track_modules=False), 'observer_floor': the native extension's RecordFunction observer
    registered as a meter registers it, doing nothing (what the RecordFunction machinery alone
    costs), 'dispatch_floor': the capture key with no meter (its boxed fallback and its
    unboxed kernels passing every op on: what a capture at the dispatcher costs at least; with
    no meter no op is classified, so the zero ops take the general path),
    'native_recordfunction': native with the RecordFunction capture instead of the key
    (FLOPCOUNT_NATIVE_CAPTURE=recordfunction), or 'baseline_unhooked': no meter and flopcount's process-wide module hooks taken out for the
    block. (The first meter registers those hooks and they stay, so in a run that interleaves
    variants every later variant, 'baseline' included, runs with them; 'baseline_unhooked' is a
    job without flopcount, and its difference to 'baseline' is what the idle hooks cost.)"""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    import flopcount

    if kind == "baseline":
        return contextlib.nullcontext()
    if kind == "baseline_unhooked":
        return _unhooked()
    if kind == "flopcountermode":
        return FlopCounterMode(display=False)
    if kind == "observer_floor":
        return _observer_floor()
    if kind == "dispatch_floor":
        return _dispatch_floor()
    if kind == "native_untracked":
        return flopcount.meter(backend="native", warn=False, track_modules=False)
    if kind == "native_recordfunction":
        return _with_capture("recordfunction", flopcount.meter(backend="native", warn=False))
    return flopcount.meter(backend=kind, warn=False)


def _with_capture(capture: str, meter):
    """``meter`` with the native capture FLOPCOUNT_NATIVE_CAPTURE=``capture`` (read at entry)."""
    import contextlib
    import os
    from unittest import mock

    from flopcount.capture.native.capture import CAPTURE_ENV

    @contextlib.contextmanager
    def block():
        with mock.patch.dict(os.environ, {CAPTURE_ENV: capture}), meter as m:
            yield m

    return block()


def _unhooked():
    import contextlib

    from torch.nn.modules import module

    from flopcount.capture.context import MODULE_HOOKS

    @contextlib.contextmanager
    def block():
        taken = []
        for hooks in (module._global_forward_pre_hooks, module._global_forward_hooks):
            for key, hook in list(hooks.items()):
                if getattr(hook, "__self__", None) is MODULE_HOOKS:
                    taken.append((hooks, key, hook))
                    del hooks[key]
        try:
            yield None
        finally:
            for hooks, key, hook in taken:
                hooks[key] = hook

    return block()


def _observer_floor():
    import contextlib

    from flopcount.capture import native

    lib = native.load()
    if lib is None:
        raise RuntimeError(f"observer_floor needs the native extension: {native.load_error()}")

    @contextlib.contextmanager
    def floor():
        lib.floor_enable()
        try:
            yield None
        finally:
            lib.floor_disable()

    return floor()


def _dispatch_floor():
    """A boxed fallback on a dispatch mode key that only passes each op on: what a capture at the
    dispatcher (instead of RecordFunction) would cost at least."""
    import contextlib

    from flopcount.capture import native

    lib = native.load()
    if lib is None:
        raise RuntimeError(f"dispatch_floor needs the native extension: {native.load_error()}")

    @contextlib.contextmanager
    def floor():
        lib.dispatch_floor_enable(True)
        try:
            yield None
        finally:
            lib.dispatch_floor_enable(False)

    return floor()


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
