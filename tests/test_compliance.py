"""EU AI Act thresholds, the base-model registry and the forecast."""
from __future__ import annotations

import csv
from fractions import Fraction
from importlib import resources

import pytest

from flopcount.compliance import UnknownBaseModel, base_models, compliance_block, lookup, sig2
from flopcount.compliance.forecast import forecast
from flopcount.compliance.thresholds import threshold

# Published figures the registry must carry (issue #4's table).
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 8.4e22, "meta-llama/Llama-2-13b-hf": 1.6e23, "meta-llama/Llama-2-70b-hf": 8.1e23,
    "meta-llama/Meta-Llama-3-8B": 7.2e23, "meta-llama/Meta-Llama-3-70B": 7.9e24,
    "meta-llama/Llama-3.1-8B": 1.2e24, "meta-llama/Llama-3.1-70B": 7.9e24, "meta-llama/Llama-3.1-405B": 3.8e25,
    "meta-llama/Llama-3.2-1B": 6.6e22, "meta-llama/Llama-3.2-3B": 1.7e23,
    "Qwen/Qwen2.5-1.5B": 1.7e23, "Qwen/Qwen2.5-3B": 3.3e23, "Qwen/Qwen2.5-7B": 8.2e23, "Qwen/Qwen2.5-14B": 1.6e24,
    "Qwen/Qwen2.5-72B": 7.8e24, "google/gemma-2-2b": 3.1e22, "google/gemma-2-9b": 4.3e23,
    "google/gemma-2-27b": 2.1e24, "microsoft/Phi-3-mini-4k-instruct": None, "allenai/OLMo-2-1124-7B": 1.8e23,
    "allenai/OLMo-2-1124-13B": 4.6e23, "mistralai/Mixtral-8x7B-v0.1": 7.7e23, "deepseek-ai/DeepSeek-V3": 3.4e24,
    "mistralai/Mistral-7B-v0.1": None,
    # Epoch AI's estimates found in the stored copies of its data (the registry had them unknown before).
    "Qwen/Qwen2.5-32B": 3.5e24, "microsoft/phi-4": 9.3e23, "mistralai/Mistral-Small-24B-Base-2501": 1.2e24,
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 2.2e22, "Qwen/Qwen3-0.6B": 1.3e23, "Qwen/Qwen3-1.7B": 3.7e23,
    "Qwen/Qwen3-4B": 8.6e23, "Qwen/Qwen3-8B": 1.8e24, "Qwen/Qwen3-14B": 3.2e24, "Qwen/Qwen3-32B": 7.1e24,
    "google/gemma-3-1b-pt": 1.2e22, "google/gemma-3-4b-pt": 9.6e22, "google/gemma-3-12b-pt": 8.6e23,
    "google/gemma-3-27b-pt": 2.3e24, "HuggingFaceTB/SmolLM3-3B-Base": None, "allenai/Olmo-3-1025-7B": None,
    # Fine-tunes: their own (Epoch AI's speculative) compute; the threshold comes from the lineage root.
    "deepseek-ai/DeepSeek-R1-Distill-Llama-70B": 2.0e22, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": 2.0e21,
    "mistralai/Mistral-Small-3.1-24B-Base-2503": None, "mistralai/Mistral-Small-3.2-24B-Instruct-2506": None,
}


def test_registry_carries_the_published_figures_with_sources():
    by_id = {m.hf_id: m for m in base_models()}
    for hf_id, flop in PUBLISHED.items():
        assert by_id[hf_id].training_flop == flop, hf_id
    assert by_id["meta-llama/Llama-3.1-405B"].systemic_risk
    assert [m.hf_id for m in base_models() if m.systemic_risk] == ["meta-llama/Llama-3.1-405B"]
    text = resources.files("flopcount.compliance").joinpath("base_models.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["hf_id", "aliases", "training_flop", "method", "systemic_risk", "source",
                            "base_model", "config"]  # lineage and the shipped architecture config
    assert all(row["source"].strip() for row in rows)
    assert {row["method"] for row in rows} <= {"reported", "6ND", "hardware", "combined", "unknown"}
    # The rule: the provider's figure, else Epoch AI's estimate, else unknown (never a 6ND computed here).
    assert not [row["hf_id"] for row in rows if "computed here" in row["source"]]
    assert all(bool(row["training_flop"]) == (row["method"] != "unknown") for row in rows)
    for hf_id, flop in {"meta-llama/Llama-3.3-70B-Instruct": 6.9e24, "meta-llama/Llama-4-Scout-17B-16E": 4.1e24,
                        "openai/gpt-oss-120b": 4.9e24, "Qwen/Qwen3-235B-A22B": 4.8e24}.items():  # Epoch AI's
        assert by_id[hf_id].training_flop == flop and "Epoch AI" in by_id[hf_id].source, hf_id


def test_6nd_entries_match_parameters_times_tokens():
    # Epoch AI's 6 x N x D for entries whose card states both (two significant figures).
    assert sig2(6 * 7e9 * 2e12) == sig2(lookup("llama-2-7b").training_flop)
    assert sig2(6 * 7.6e9 * 18e12) == sig2(lookup("qwen2.5-7b").training_flop)
    assert sig2(6 * 1.23e9 * 9e12) == sig2(lookup("llama-3.2-1b").training_flop)
    assert sig2(6 * 32.5e9 * 18e12) == sig2(lookup("qwen2.5-32b").training_flop)
    # DeepSeek-V3: 6ND for pre-training plus Epoch's 1.222e23 for post-training (0.1M H800-hours).
    assert sig2(6 * 37e9 * 14.8e12 + 1.222e23) == sig2(lookup("deepseek-v3").training_flop)
    assert sig2(6 * 8.2e9 * 36e12) == sig2(lookup("qwen3-8b").training_flop)
    # Phi-4: Epoch's geometric mean of 6ND and 1920 H100 x 504 h x 989.5 TFLOP/s x 30 %.
    assert sig2((6 * 14e9 * 10e12 * 1920 * 504 * 3600 * 989.5e12 * 0.3) ** 0.5) == sig2(lookup("phi-4").training_flop)
    # TinyLlama: Epoch's hardware estimate, 16 A100 x 312 TFLOP/s x 90 days x 56 % utilisation.
    assert sig2(16 * 312e12 * 90 * 24 * 3600 * 0.56) == sig2(lookup("tinyllama").training_flop)
    assert sig2(6 * 27e9 * 14e12) == sig2(lookup("gemma-3-27b").training_flop)
    # R1 distills: Epoch's 6 x N x 24B tokens (800k samples x 30k tokens) x 2 epochs.
    assert sig2(6 * 70e9 * 24e9 * 2) == sig2(lookup("deepseek-r1-distill-llama-70b").training_flop)
    # Llama 3.1 8B: Epoch's geometric mean of 6ND and 1.46M H100-hours x 990 TFLOP/s x 40 %.
    assert sig2((6 * 8e9 * 15e12 * 1.46e6 * 3600 * 9.9e14 * 0.4) ** 0.5) == sig2(lookup("llama-3.1-8b").training_flop)


def test_shipped_fine_tunes_take_the_threshold_of_their_original_model():
    from flopcount.compliance.thresholds import resolve_base

    small = resolve_base("mistral-small-3.2")  # 3.2 <- 3.1 <- Mistral Small 3 (Epoch AI's base-model entries)
    assert small["lineage"][-1] == "mistralai/Mistral-Small-24B-Base-2501" and small["base_model_flops"] == 1.2e24
    assert small["prior_modification_flops"] == 0  # neither update's own compute is published
    distill = resolve_base("deepseek-r1-distill-qwen-7b")
    assert distill["lineage"] == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-7B"]
    # Both earlier modifications count as prior work: the distillation and Qwen2.5-Math's continued pretraining.
    assert distill["base_model_flops"] == 8.2e23 and distill["prior_modification_flops"] == pytest.approx(2.0e21 + 4.2e22)


def test_every_registry_row_has_a_method_and_a_source_that_names_its_basis():
    """The rule, row by row: a figure is the provider's (reported) or Epoch AI's (its technique as the
    method, and the source names Epoch AI); no figure means method unknown."""
    from flopcount.compliance.registry import METHODS

    assert set(METHODS) == {"reported", "6ND", "hardware", "combined", "measured", "unknown"}
    for model in base_models():
        assert model.method in METHODS and model.method != "measured", model.hf_id  # measured: organisations only
        assert len(model.source) > 20, model.hf_id
        assert (model.training_flop is None) == (model.method == "unknown"), model.hf_id
        if model.method in ("6ND", "hardware", "combined"):
            assert "Epoch AI" in model.source, model.hf_id


def test_lookup_by_id_alias_and_spelling_variants():
    assert lookup("meta-llama/Llama-3.1-8B").hf_id == "meta-llama/Llama-3.1-8B"
    assert lookup("Llama-3.1-8B-Instruct").hf_id == "meta-llama/Llama-3.1-8B"
    assert lookup("llama3.1 8b").hf_id == "meta-llama/Llama-3.1-8B"
    assert lookup("MISTRALAI/MISTRAL-7B-INSTRUCT-V0.2").training_flop is None


def test_unknown_model_names_close_matches():
    with pytest.raises(UnknownBaseModel) as error:
        lookup("llama-3.1-7b")
    message = str(error.value)
    assert "'llama-3.1-7b' is not in the registry" in message and "meta-llama/Llama-3.1-8B" in message
    assert "\n" not in message


@pytest.mark.parametrize("base, systemic, expected, basis", [
    (8.4e22, False, Fraction(84 * 10**21, 3), "base_model_compute"),
    (None, False, Fraction(10**23, 3), "unknown_base_compute"),
    (None, True, Fraction(10**25, 3), "systemic_unknown_base_compute"),
    (3.8e25, True, Fraction(38 * 10**24, 3), "base_model_compute"),  # known compute wins over the flag
])
def test_threshold_rules(base, systemic, expected, basis):
    assert threshold(base, systemic) == (expected, basis)


def test_statuses_at_the_boundaries():
    limit = 28 * 10**21  # one third of Llama 2 7B's 8.4e22, exactly
    assert compliance_block(limit, "llama-2-7b")["status"] == "exceeds"
    assert compliance_block(limit - 1, "llama-2-7b")["status"] == "approaching"
    assert compliance_block(limit * 8 // 10, "llama-2-7b")["status"] == "approaching"
    assert compliance_block(limit * 8 // 10 - 1, "llama-2-7b")["status"] == "below"
    assert compliance_block(limit // 2, "llama-2-7b", approaching=0.5)["status"] == "approaching"
    block = compliance_block(21 * 10**21, "llama-2-7b")
    assert block["ratio"] == 0.75 and block["text"]["threshold_flops"] == "2.8e22 FLOP"
    assert block["combined_flops"] == 1.05e23 and block["combined_status"] == "below"


def test_combined_check_against_1e25():
    block = compliance_block(10**24, "meta-llama/Llama-3.1-405B")
    assert block["threshold_flops"] == pytest.approx(3.8e25 / 3) and block["status"] == "below"
    assert block["combined_status"] == "exceeds"  # 3.9e25 >= 1e25: informational only


def test_two_significant_figures():
    assert [sig2(v) for v in (23_456, 2.25e22, 9.96e22, 1e23 / 3, 0, 7)] == \
        ["2.3e4", "2.2e22", "1.0e23", "3.3e22", "0", "7.0e0"]


def test_forecast_from_measured_steps():
    per_step = 10**18
    result = forecast(5 * per_step, 5, threshold_flops=Fraction(10**23, 3), planned_steps=50_000,
                      measured_tokens=5 * 4096, seconds_per_step=2.0)
    assert result["projected_training_flops"] == 5e22 and result["projected_status"] == "exceeds"
    crossing = -(-10**23 // (3 * per_step))  # ceil(threshold / per step)
    assert result["crossing_step"] == crossing == 33_334
    assert result["crossing_after_s"] == crossing * 2.0
    assert result["crossing_tokens"] == pytest.approx(10**23 / 3 / (per_step / 4096))
    by_tokens = forecast(5 * per_step, 5, threshold_flops=Fraction(10**23, 3), planned_tokens=4096 * 1000,
                         measured_tokens=5 * 4096)
    assert by_tokens["projected_training_flops"] == 1e21 and by_tokens["projected_status"] == "below"
    assert not by_tokens["crosses_threshold"]
    with pytest.raises(ValueError, match="no token counts"):
        forecast(10, 1, threshold_flops=Fraction(100), planned_tokens=10)
