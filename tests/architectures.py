"""The architecture sweep's machinery (tests/test_architecture_sweep.py): every causal-LM architecture of
the installed transformers, built from a small config, one training step on CPU under the meter.

``python tests/architectures.py [TYPE ...]`` runs the sweep outside pytest and prints one line per
architecture (counted, skipped and why, or failed), for looking at new transformers releases.
"""
from __future__ import annotations

import math
import sys
import time

import torch

# Tiny sizes (the sweep runs in `make test` on 2 CPU cores): every size key that some config has.
SMALL = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_layers=2, n_layer=2, n_layers=2,
             num_attention_heads=4, num_key_value_heads=2, n_head=4, n_embd=32, d_model=32, head_dim=8,
             vocab_size=128, max_position_embeddings=64, n_positions=64, moe_intermediate_size=16,
             shared_expert_intermediate_size=16, num_experts=4, n_routed_experts=4, num_local_experts=4,
             num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=8, ffn_hidden_size=32, ffn_dim=32, decoder_layers=2, decoder_ffn_dim=32,
             decoder_attention_heads=4, encoder_layers=2, encoder_ffn_dim=32, encoder_attention_heads=4,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, first_k_dense_replace=1, n_group=1, topk_group=1,
             rotary_dim=8, state_size=8, time_step_rank=8, conv_kernel=4, expand=2, n_groups=1, mamba_d_state=8,
             mamba_n_heads=8, mamba_d_head=8, mamba_d_conv=4, mamba_n_groups=1, ssm_state_size=8,
             mamba_expand=2, chunk_size=8, mamba_chunk_size=8, attention_chunk_size=8, sliding_window=8,
             linear_head_dim=8, linear_num_heads=4, num_experts_per_token=2, use_cache=False,
             tie_word_embeddings=False, initializer_range=0.02, vocab_size_per_layer_input=128,
             hidden_size_per_layer_input=8, num_kv_shared_layers=0)
# Per-architecture corrections where a size key means something else, or two sizes must agree.
PER_TYPE = {  # None: leave the key out
    "mamba2": dict(num_heads=8),  # num_heads * head_dim = expand * hidden_size
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),  # one (global, local) pair: 2 layers
    "prophetnet": dict(num_hidden_layers=None, num_encoder_layers=2, num_decoder_layers=2),
    "reformer": dict(is_decoder=True, axial_pos_shape=(2, 4), axial_pos_embds_dim=(16, 16), local_attn_chunk_length=4,
                     lsh_attn_chunk_length=4, num_buckets=2, attn_layers=["local", "lsh"]),
}
BATCH, SEQ = 2, 8


class Skip(Exception):
    """The architecture cannot be built or trained from a small default config (reason given)."""


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _settable(config, key: str) -> bool:
    """The config has ``key`` and it can be set (not a read-only property; reading it may raise
    for per-layer attributes)."""
    attribute = getattr(type(config), key, None)
    if isinstance(attribute, property) and attribute.fset is None:
        return False
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - e.g. a per-layer attribute read globally
        return False


def small_config(model_type: str, attn: str):
    from transformers import AutoConfig

    try:
        default = AutoConfig.for_model(model_type)
    except Exception as exc:
        raise Skip(f"no default config: {type(exc).__name__}: {str(exc)[:100]}") from None
    try:
        text = getattr(default, "get_text_config", lambda: default)()
    except ValueError as exc:  # e.g. musicgen: a text encoder and a decoder
        raise Skip(f"composite config with several text configs: {str(exc)[:100]}") from None
    sizes = {**SMALL, **PER_TYPE.get(model_type, {})}
    overrides = {k: v for k, v in sizes.items() if v is not None and _settable(text, k)}
    if "kv_lora_rank" in overrides:  # multi-head latent attention: K and V have every query head
        overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    per_layer = _small_per_layer(text, overrides)
    if per_layer is not None:
        overrides["per_layer_config"] = per_layer
    layers = {key: _resize(getattr(text, key), 2) for key in ("layer_types", "layers_block_type", "block_types",
                                                                         "mlp_layer_types")
              if _settable(text, key) and isinstance(getattr(text, key, None), list)}
    error = None
    for attempt in ({**overrides, **layers}, overrides) if layers else (overrides,):
        try:  # per-layer lists cut to the layer count; some configs derive them and refuse a list
            if text is default:
                config = type(default)(**attempt)
            else:  # a composite config (text + vision): shrink the text part
                config = type(default)(text_config={**text.to_dict(), **attempt})
            break
        except Exception as exc:  # noqa: BLE001 - the reason is reported
            error = exc
    else:
        raise Skip(f"small config rejected: {type(error).__name__}: {str(error)[:120]}") from None
    config._attn_implementation = attn
    return config


def _small_per_layer(text, overrides: dict) -> dict | None:
    """A per-layer override table (Gemma 4: a wider head every sixth layer) cut to the small
    config's 2 layers: its first entry on layer 1, its sizes twice the small ones, so the layer
    still differs from the others."""
    try:
        table = text.to_dict().get("per_layer_config")
    except Exception:  # noqa: BLE001 - no such table
        return None
    if not isinstance(table, dict) or not table:
        return None
    first = next(iter(table.values()))
    return {"1": {key: 2 * overrides[key] if isinstance(value, int) and isinstance(overrides.get(key), int) else value
                  for key, value in first.items()}}


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
    languages = getattr(model.config, "languages", None)
    if hasattr(model, "set_default_language") and languages:  # X-MOD: one adapter per language
        model.set_default_language(languages[0])
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


def metered_step(model, inputs, backend: str, reference: bool = True) -> tuple[dict, dict | None]:
    """One step under flopcount (``backend``) and, with ``reference``, torch's FlopCounterMode
    together: (our summary, FlopCounterMode's per-op totals or None)."""
    import contextlib

    import flopcount
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False) if reference else contextlib.nullcontext()
    with flopcount.meter(backend=backend, warn=False) as m, counter:
        train_step(model, inputs)
        m.step()
    model.zero_grad(set_to_none=True)
    if not reference:
        return m.summary(), None
    return m.summary(), {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def _trains_unmetered(model, inputs) -> None:
    """Raise Skip when the architecture's own step fails without any meter (a config problem)."""
    try:
        train_step(model, inputs)
    except Exception as exc:
        raise Skip(f"does not train from the small config without the meter: {type(exc).__name__}: "
                   f"{str(exc)[:120]}") from None
    model.zero_grad(set_to_none=True)


FUSED_ATTENTION = ("attention", "flash")  # op names FlopCounterMode counts 0 for on CPU (torch 2.13)


def check(model_type: str, backend: str = "native") -> dict:
    """Run one architecture, one training step with its default attention (SDPA where it has it)
    under ``backend`` and FlopCounterMode at once: zero uncounted ops and dark modules; matmul
    FLOPs equal FlopCounterMode's (which counts 0 for CPU fused attention, whose formula
    tests/test_formulas.py pins), closed forms for MoE expert GEMMs and grouped convolutions,
    which FlopCounterMode does not count right. Raises Skip or AssertionError; returns figures
    for the sweep's table."""
    model = build(model_type, "sdpa")
    inputs = batch(model)
    reference_error = None
    try:
        ours, theirs = metered_step(model, inputs, backend)
    except Exception as exc:  # FlopCounterMode's module tracker fails on some models (reversible layers)
        reference_error = f"{type(exc).__name__}: {str(exc)[:80]}"
        try:
            ours, theirs = metered_step(model, inputs, backend, reference=False)
        except Exception:
            _trains_unmetered(model, inputs)  # a Skip when the model itself fails
            raise
    assert ours["uncounted_ops"] == {}, f"{model_type}: uncounted {ours['uncounted_ops']}"
    assert ours["dark_modules"] == {}, f"{model_type}: dark modules {ours['dark_modules']}"
    assert ours["training_flops"] > 0
    if theirs is None:
        return {"training_flops": ours["training_flops"], "ops": len(ours["by_op"]),
                "no_reference": f"FlopCounterMode fails on this model ({reference_error})"}
    grouped_mm = ours["by_op"].get("aten._grouped_mm", {}).get("flops", 0)
    conv_theirs = sum(n for op, n in theirs.items() if "convolution" in op)
    ours_matmul = ours["by_category"]["matmul"] - grouped_mm
    theirs_matmul = sum(n for op, n in theirs.items()
                        if "convolution" not in op and not any(w in op for w in FUSED_ATTENTION))
    assert ours_matmul == theirs_matmul, f"{model_type}: matmul {ours_matmul} vs FlopCounterMode {theirs_matmul}"
    if grouped_mm:  # FlopCounterMode has no _grouped_mm formula: the closed form instead
        expected = moe_closed_form(model)
        assert grouped_mm == expected, f"{model_type}: _grouped_mm {grouped_mm} vs closed form {expected}"
    conv = ours["by_category"]["conv"]
    if _has_grouped_conv(model):  # FlopCounterMode multiplies grouped weight gradients by groups
        expected = conv_closed_form(model)
        assert conv == expected, f"{model_type}: conv {conv} vs closed form {expected}"
    else:
        assert conv == conv_theirs, f"{model_type}: conv {conv} vs FlopCounterMode {conv_theirs}"
    return {"training_flops": ours["training_flops"], "ops": len(ours["by_op"]), "matmul": ours_matmul,
            "attention": ours["by_category"]["attention"], "grouped_mm": grouped_mm, "conv": conv,
            "attn": model.config._attn_implementation}


def moe_closed_form(model) -> int:
    """Expert GEMMs of one training step: each token meets top_k experts in every MoE layer, whose
    expert weights are 3-D parameters [experts, a, b] (a x b multiply-adds per token each); the
    backward computes input and weight gradients, twice the forward."""
    text = getattr(model.config, "get_text_config", lambda: model.config)()
    top_k = getattr(text, "num_experts_per_tok", None) or getattr(text, "moe_topk", None)
    per_expert = sum(math.prod(p.shape[1:]) for name, p in model.named_parameters()
                     if p.dim() == 3 and ".experts." in f".{name}")
    return 3 * 2 * BATCH * SEQ * top_k * per_expert


def conv_closed_form(model) -> int:
    """Convolutions of one training step from the conv modules' own sizes: each runs once per step
    on [BATCH, C_in, SEQ] (causal padding keeps SEQ outputs, after trimming): forward
    2·B·L_out·C_out·(C_in/groups)·K, backward the input gradient (same) and the weight gradient
    (same) — the input gradient only where the conv's input requires a gradient (always here)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv1d):
            k, pad = m.kernel_size[0], m.padding[0]
            out_len = SEQ + 2 * pad - m.dilation[0] * (k - 1)
            total += 3 * 2 * BATCH * out_len * m.out_channels * (m.in_channels // m.groups) * k
    return total


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
