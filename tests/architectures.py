"""The architecture sweep's machinery (tests/test_architectures.py): every causal-LM architecture of
the installed transformers, built from a small config, one training step on CPU under the meter.

``python tests/architectures.py [TYPE ...]`` runs the sweep outside pytest and prints one line per
architecture (counted, skipped and why, or failed), for looking at new transformers releases.
"""
from __future__ import annotations

import math
import sys
import time

import torch

SMALL = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_layers=2, n_layer=2, n_layers=2,
             num_attention_heads=4, num_key_value_heads=2, n_head=4, n_embd=64, d_model=64, head_dim=16,
             vocab_size=128, max_position_embeddings=128, n_positions=128, moe_intermediate_size=32,
             shared_expert_intermediate_size=32, num_experts=4, n_routed_experts=4, num_local_experts=4,
             num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, ffn_hidden_size=64, ffn_dim=64, decoder_layers=2, decoder_ffn_dim=64,
             decoder_attention_heads=4, encoder_layers=2, encoder_ffn_dim=64, encoder_attention_heads=4,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, first_k_dense_replace=1,
             state_size=8, time_step_rank=8, conv_kernel=4, expand=2, n_groups=1, mamba_d_state=8,
             mamba_n_heads=8, mamba_d_head=16, mamba_d_conv=4, mamba_n_groups=1, ssm_state_size=8,
             attention_chunk_size=8, sliding_window=8, use_cache=False, tie_word_embeddings=False,
             initializer_range=0.02)
BATCH, SEQ = 2, 8


class Skip(Exception):
    """The architecture cannot be built or trained from a small default config (reason given)."""


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def small_config(model_type: str, attn: str):
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
    except Exception as exc:
        raise Skip(f"no default config: {type(exc).__name__}: {str(exc)[:100]}") from None
    text = getattr(default, "get_text_config", lambda: default)()
    overrides = {k: v for k, v in SMALL.items() if hasattr(text, k)}
    for key in ("layer_types", "layers_block_type", "block_types"):
        settable = not isinstance(getattr(type(text), key, None), property)
        if settable and isinstance(getattr(text, key, None), list):
            overrides[key] = _resize(getattr(text, key), 2)
    try:
        if text is default:
            config = type(default)(**overrides)
        else:  # a composite config (text + vision): shrink the text part
            config = type(default)(text_config={**text.to_dict(), **overrides})
    except Exception as exc:
        raise Skip(f"small config rejected: {type(exc).__name__}: {str(exc)[:120]}") from None
    config._attn_implementation = attn
    return config


def _resize(values: list, n: int) -> list:
    kinds = list(dict.fromkeys(values))[:n]
    return (kinds * n)[:n]


MAX_PARAMETERS = 3_000_000  # a "small" config that is not small (sizes the overrides do not reach)


def build(model_type: str, attn: str):
    from transformers import AutoModelForCausalLM

    for attempt in (attn, "eager"):  # some architectures support eager attention only
        config = small_config(model_type, attempt)
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                    config, attn_implementation=attempt).parameters())
            break
        except ValueError as exc:
            if attempt == "eager" or "attention" not in str(exc):
                raise Skip(f"does not build from a small config: ValueError: {str(exc)[:120]}") from None
        except Exception as exc:
            raise Skip(f"does not build from a small config: {type(exc).__name__}: {str(exc)[:120]}") from None
    if size > MAX_PARAMETERS:
        raise Skip(f"{size:,} parameters from the small config (sizes it does not shrink)")
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attempt)
    except Exception as exc:
        raise Skip(f"does not build from a small config: {type(exc).__name__}: {str(exc)[:120]}") from None
    model.train()
    return model


def batch(model) -> dict:
    vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else 128
    ids = torch.randint(3, min(vocab, 128), (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model, inputs) -> None:
    out = model(**inputs)
    loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().pow(2).mean()
    loss.backward()


def gemm_flop_counter(model, inputs) -> tuple[dict, dict]:
    """One step under flopcount (dispatch) and torch's FlopCounterMode together: (our summary,
    FlopCounterMode's per-op totals)."""
    import flopcount
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with flopcount.meter(backend="dispatch", warn=False) as m, counter:
        train_step(model, inputs)
        m.step()
    return m.summary(), {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def check(model_type: str, backend: str = "native") -> dict:
    """Run one architecture: zero uncounted ops and dark modules (default attention, ``backend``),
    and eager-attention GEMM FLOPs equal to FlopCounterMode's where that is complete. Raises Skip
    or AssertionError; returns figures for the sweep's table."""
    import flopcount

    model = build(model_type, "sdpa")
    inputs = batch(model)
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:
        raise Skip(f"forward fails without the meter: {type(exc).__name__}: {str(exc)[:120]}") from None
    with flopcount.meter(backend=backend, warn=False) as m:
        train_step(model, inputs)
        m.step()
    s = m.summary()
    assert s["uncounted_ops"] == {}, f"{model_type}: uncounted {s['uncounted_ops']}"
    assert s["dark_modules"] == {}, f"{model_type}: dark modules {s['dark_modules']}"
    assert s["training_flops"] > 0
    result = {"training_flops": s["training_flops"], "ops": len(s["by_op"])}
    eager = build(model_type, "eager")
    ours, theirs = gemm_flop_counter(eager, batch(eager))
    assert ours["uncounted_ops"] == {}, f"{model_type} (eager): uncounted {ours['uncounted_ops']}"
    grouped_mm = ours["by_op"].get("aten._grouped_mm", {}).get("flops", 0)
    conv_theirs = sum(n for op, n in theirs.items() if "convolution" in op)
    ours_gemm = ours["by_category"]["matmul"] + ours["by_category"]["attention"] - grouped_mm
    theirs_gemm = sum(theirs.values()) - conv_theirs
    assert ours_gemm == theirs_gemm, f"{model_type}: matmul+attention {ours_gemm} vs FlopCounterMode {theirs_gemm}"
    if grouped_mm:  # FlopCounterMode has no _grouped_mm formula: the closed form instead
        expected = moe_closed_form(eager)
        assert grouped_mm == expected, f"{model_type}: _grouped_mm {grouped_mm} vs closed form {expected}"
    result.update(gemm=ours_gemm, grouped_mm=grouped_mm, conv=ours["by_category"]["conv"], conv_fcm=conv_theirs,
                  moe=bool(grouped_mm))
    if not _has_grouped_conv(eager):  # FlopCounterMode multiplies grouped weight gradients by groups
        assert ours["by_category"]["conv"] == conv_theirs, f"{model_type}: conv {ours['by_category']['conv']} vs {conv_theirs}"
    return result


def moe_closed_form(model) -> int:
    """Expert GEMMs of one training step: each token meets top_k experts in every MoE layer, whose
    expert weights are 3-D parameters [experts, a, b] (a x b multiply-adds per token each); the
    backward computes input and weight gradients, twice the forward."""
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    top_k = getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_topk", None)
    per_expert = sum(math.prod(p.shape[1:]) for name, p in model.named_parameters()
                     if p.dim() == 3 and ".experts." in f".{name}")
    return 3 * 2 * BATCH * SEQ * top_k * per_expert


def _has_grouped_conv(model) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) and m.groups > 1 for m in model.modules())


def main(types: list[str]) -> int:
    failed = 0
    for model_type in types or causal_lm_types():
        start = time.perf_counter()
        try:
            result = check(model_type)
            line = f"ok      {model_type}: {result}"
        except Skip as skip:
            line = f"skipped {model_type}: {skip}"
        except Exception as exc:  # noqa: BLE001 - a sweep lists every failure
            failed += 1
            line = f"FAILED  {model_type}: {type(exc).__name__}: {str(exc)[:300]}"
        print(f"{time.perf_counter() - start:6.1f}s {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    sys.exit(main(sys.argv[1:]))
