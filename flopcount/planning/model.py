"""The planned model: a Hugging Face causal LM built from its config.json on the meta device.

No weights are read and nothing is allocated. LoRA adapters come from peft, as in training.
QLoRA: bitsandbytes' NF4 Linear cannot be built on the meta device, so each quantized base
Linear is planned as what it computes, a frozen Linear: the same forward GEMM and the same
input-gradient GEMM, no weight gradient (convention: all precisions count the same; the
dequantization of the 4-bit weights, vector work the GPU does before its GEMM, is not planned).
Multimodal configs (Gemma 3, Llama 4, Mistral Small 3.1) plan their text model (``text_config``).
The config is taken as it is (``use_cache`` included: with a cache, transformers skips its
packed-sequence check, a few FLOP), so that the plan runs what training with that config runs.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import torch

from ..errors import BadInput

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OPTIMIZERS = ("adamw", "sgd", "adafactor")
ATTENTION = ("sdpa", "eager")


def hf_config(values: dict, attn: str):
    """A transformers PretrainedConfig from config.json values (the text model's, for multimodal ones)."""
    import transformers

    values = dict(values)
    if isinstance(values.get("text_config"), dict) and values.get("model_type") not in _TEXT_TYPES:
        values = dict(values["text_config"])
    model_type = values.pop("model_type", None)
    if not model_type:
        raise BadInput("flopcount: the model config has no model_type; give a Hugging Face config.json")
    for key in ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype",
                "transformers_version", "_name_or_path"):
        values.pop(key, None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as e:
        raise BadInput(f"flopcount: model_type {model_type!r} is not known to the installed transformers "
                         f"{transformers.__version__} ({str(e).splitlines()[0][:120]})") from None
    config._attn_implementation = attn
    return config


_TEXT_TYPES = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "llama4_text"}


def build(values: dict, *, attn: str = "sdpa", dtype: str = "bfloat16", lora_rank: int | None = None,
          lora_targets: tuple[str, ...] = ("q_proj", "v_proj"), lora_alpha: int | None = None,
          gradient_checkpointing: bool = False, device="meta"):
    """The model in training mode on ``device`` (meta: nothing allocated)."""
    import transformers

    config = hf_config(values, attn)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        with torch.device(device):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
            except ValueError as e:
                raise BadInput(f"flopcount: cannot build {config.model_type!r} as a causal LM with "
                                 f"attention {attn!r}: {str(e).splitlines()[0][:160]}") from None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_rank:
            model.enable_input_require_grads()
    if lora_rank:
        model = with_lora(model, lora_rank, lora_targets, lora_alpha)
    model.train()
    return model


def with_lora(model, rank: int, targets: tuple[str, ...], alpha: int | None = None):
    import peft

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise BadInput(f"flopcount: --lora-targets {','.join(missing)} name no Linear layer of this model "
                         f"(it has {', '.join(sorted(names))})")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=list(targets))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def optimizer(model, name: str):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BadInput("flopcount: the planned model has no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2)
    raise BadInput(f"flopcount: optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def parameter_counts(model) -> tuple[int, int]:
    """(all parameters, trainable parameters); tied weights counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable
