"""Shared fixtures: tiny models built from configs (random weights; FLOPs do not depend on them)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def tiny_llama_config(**overrides):
    import transformers

    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               attn_implementation="sdpa", tie_word_embeddings=False)
    cfg.update(overrides)
    return transformers.LlamaConfig(**cfg)


def tiny_llama(**overrides):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(**overrides))


@pytest.fixture
def llama_factory():
    return tiny_llama


@pytest.fixture(params=["dispatch"])
def backend(request):
    """Capture backend under test (the native backend adds itself here when it builds)."""
    return request.param


def _native_skip_reason():
    """None when the native capture backend builds and loads here, else why not."""
    try:
        from flopcount.capture import native
    except ImportError as exc:  # the module itself is missing
        return f"native backend not available: {exc}"
    return native.load_error()


@pytest.fixture(params=["dispatch", "native"])
def backend(request):
    """Capture backend to run a counting test under; both must give identical results."""
    if request.param == "native":
        reason = _native_skip_reason()
        if reason:
            pytest.skip(reason)
    return request.param


def pytest_collection_modifyitems(session, config, items):
    """torch.compile's tests last: once Dynamo has compiled in a process, later native meters
    capture through RecordFunction (capture/native/capture.py dynamo_has_compiled), so the rest of
    the suite runs the default capture key first."""
    items.sort(key=lambda item: os.path.basename(str(item.fspath)).startswith("test_compile"))
