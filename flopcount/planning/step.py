"""One real training step of a model on the meta device, counted by the meter.

The step is the user's step: forward, loss, backward (``grad_accum`` times), optimizer step.
Meta tensors are plain tensors to the dispatch backend, so every op is booked by the same
formulas and phases as a metered CPU or GPU step; nothing is computed and nothing is allocated.

Fused attention: on the meta device ``scaled_dot_product_attention`` would take its math path
(bmm + softmax over every pair, masked pairs included). A GPU runs a fused kernel, so the plan
routes each call to the fused op the CPU runs (``aten._scaled_dot_product_flash_attention_for_cpu``,
forward and backward), which the attention formulas count as the fused kernel: causal attention
books only its unmasked pairs.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SDPA = torch.nn.functional.scaled_dot_product_attention


@contextlib.contextmanager
def fused_attention():
    """Routes scaled_dot_product_attention to the fused (flash) op, as the CPU and GPUs run it
    when head dims match and there is no dropout; other calls keep torch's own choice.

    The function itself is replaced while the plan runs (not a TorchFunctionMode, which the
    recompute of activation checkpointing does not see from the autograd engine)."""
    def routed(*args, **kwargs):
        out = fused_sdpa(*args, **kwargs)
        return out if out is not None else _SDPA(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    if query.dim() != 4 or query.shape[-1] != value.shape[-1] or key.shape[-1] != query.shape[-1]:
        return None  # the fused kernels need one head dim; torch decides
    if dropout_p and torch.is_grad_enabled():
        return None
    if key.shape[1] != query.shape[1] and not enable_gqa:
        return None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # As torch does before a fused kernel: a boolean mask becomes an additive one.
        attn_mask = torch.where(attn_mask, 0.0, -math.inf).to(query.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def unpacked_batches():
    """transformers looks for packed sequences in the position ids with a data-dependent check
    (``.all()``), which meta tensors cannot answer. Planned batches are not packed: the check's
    ops still run and are booked, and its answer is the known one."""
    from transformers import masking_utils

    find, tracing = masking_utils.find_packed_sequence_indices, masking_utils.is_tracing

    def planned(position_ids):
        masking_utils.is_tracing = lambda tensor=None: True  # the ops up to the check, no .item()
        try:
            packed = find(position_ids)
        finally:
            masking_utils.is_tracing = tracing
        (packed[:, -1] == 0).all()  # the check a real step makes; its answer here: not packed
        return None

    masking_utils.find_packed_sequence_indices = planned
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find


class MetaScalars(TorchDispatchMode):
    """Answers ``.item()`` of meta tensors inside the optimizer step. Optimizers read scalars
    that only scale an update (Adafactor's parameter RMS, its step count), never choose which
    ops run, so any value gives the same ops: 1 is used. The ops that produce the scalar still
    run below this mode and are booked."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 1
        return func(*args, **(kwargs or {}))


def training_step(model, optimizer, *, batch_size: int, seq_len: int, grad_accum: int, device="meta") -> None:
    """Forward and backward over ``grad_accum`` micro-batches of ``batch_size`` x ``seq_len``
    tokens (labels = inputs, the causal-LM loss), then one optimizer step."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    for _ in range(grad_accum):
        loss = model(input_ids=ids, labels=ids).loss
        (loss / grad_accum).backward() if grad_accum > 1 else loss.backward()
    with MetaScalars() if device == "meta" else contextlib.nullcontext():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def metered_step(model, optimizer, *, batch_size: int, seq_len: int, grad_accum: int,
                 fused: bool = True) -> dict:
    """Meter.summary() of one planned optimizer step."""
    from ..meter import Meter

    tokens = batch_size * seq_len * grad_accum
    with Meter(None, backend="dispatch", energy=False, warn=False) as meter:
        with contextlib.ExitStack() as stack:
            stack.enter_context(unpacked_batches())
            if fused:
                stack.enter_context(fused_attention())
            training_step(model, optimizer, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum)
        meter.step(tokens=tokens, samples=batch_size * grad_accum)
    return meter.summary()
