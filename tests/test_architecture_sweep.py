"""The architecture sweep: every causal-LM architecture of the installed transformers, built from a
tiny config (tests/architectures.py), trains one step on CPU under the meter with zero uncounted
ops and no dark modules, under the native backend (the default) with its default attention; then
with eager attention its GEMM work equals torch's FlopCounterMode where that is complete, and
closed forms for MoE expert GEMMs (``aten._grouped_mm``, which FlopCounterMode does not count) and
grouped convolutions (whose weight gradients FlopCounterMode multiplies by the group count).

An architecture is skipped only when it cannot be built or trained from a small default config
at all (without the meter), or the small config is not small; the reason is given per
architecture (``pytest -ra`` lists them). Where FlopCounterMode itself breaks the step (its module
tracker fails on reversible layers: reformer) the meter still runs, with zero uncounted ops, and
the GEMM comparison is left out (printed).
A few representative architectures run always; the rest are marked ``slow`` (``-m "not slow"``
leaves them out for a quick local run; ``make test`` and CI run them).
"""
from __future__ import annotations

import warnings

import pytest

import architectures as sweep

# Dense, GQA, sliding-window, MoE (grouped GEMM), MLA, SSM (grouped conv), hybrid, encoder-style.
FAST = ("llama", "qwen2", "gemma2", "gpt2", "mixtral", "qwen3_moe", "deepseek_v3", "mamba", "mamba2",
        "jamba", "falcon")


def _types():
    try:
        types = sweep.causal_lm_types()
    except ImportError:
        return []
    return [t if t in FAST else pytest.param(t, marks=pytest.mark.slow) for t in types]


@pytest.mark.parametrize("model_type", _types())
def test_architecture_meters_exactly(model_type):
    pytest.importorskip("transformers")
    backend = "dispatch" if sweep_native_missing() else "native"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = sweep.check(model_type, backend=backend)
        except sweep.Skip as skip:
            pytest.skip(f"{model_type}: {skip}")
    assert result["training_flops"] > 0
    if "no_reference" in result:  # counted, zero uncounted, but no independent GEMM check
        print(f"{model_type}: {result['no_reference']}")


def sweep_native_missing() -> bool:
    from flopcount.capture import native

    return native.load_error() is not None
