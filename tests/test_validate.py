"""The validation benchmark (benchmarks/validate.py): flopcount's GEMM count against closed forms.

Tiny shapes run in-process; the expectations are derived here from the models' own parameter
shapes and the textbook formulas, not copied from any output.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


validate = _load("flopcount_bench_validate", ROOT / "benchmarks" / "validate.py")
throughput = _load("flopcount_bench_throughput", ROOT / "benchmarks" / "throughput.py")

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=96, vocab=128, batch=2, seq=32)


def tiny(name: str, **overrides) -> "validate.Case":
    full = validate.make_cases(quick=True)
    base = next(c for c in full if c.name == name)
    fields = dict(TINY)
    if base.family == "mixtral":
        fields.update(kv_heads=2, intermediate=48)
    if base.family == "gpt2":
        fields.update(intermediate=4 * TINY["hidden"])
    if name == "llama_gqa":
        fields.update(kv_heads=2)
    if name == "llama_lora":
        fields.update(lora_rank=4)
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def measured(case):
    summary, routed = validate.measure_flopcount(case, backend="dispatch")
    rec = summary["by_phase_category"].get("recompute", {})
    rec_gemm = sum(rec.get(c, 0) for c in ("matmul", "attention", "conv"))
    return summary, routed, rec_gemm


def linear_weights(model):
    """(name, in, out, trainable) of every 2-D linear weight outside the embedding tables."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [(n, p.shape[1], p.shape[0], p.requires_grad) for n, p in model.named_parameters()
            if p.dim() == 2 and id(p) not in embeddings]


def attention_training(case) -> int:
    """Fused causal attention of one layer, forward + backward = 3 x 2 P (D_qk + D_v), P = B H S(S+1)/2."""
    pairs = case.batch * case.heads * case.seq * (case.seq + 1) // 2
    return 3 * 2 * pairs * 2 * case.head_dim


@pytest.mark.parametrize("name", ["llama_full", "llama_gqa"])
def test_full_finetune_is_six_t_n_plus_causal_attention(name):
    case = tiny(name)
    summary, _, rec_gemm = measured(case)
    model = validate.build_model(case)
    n_linear = sum(i * o for _, i, o, _ in linear_weights(model))  # q, k, v, o, MLP, LM head
    expected = 6 * case.tokens * n_linear + case.layers * attention_training(case)
    assert summary["gemm_training_flops"] == expected
    assert validate.analytic_gemm(case).training == expected
    # recompute: only the fused kernel's score product Q K^T, 2 P D_qk
    assert rec_gemm == case.layers * 2 * case.batch * case.heads * case.seq * (case.seq + 1) // 2 * case.head_dim
    assert summary["uncounted_ops"] == {}


def test_lora_is_four_frozen_six_trainable_minus_first_layer_input_gradients():
    case = tiny("llama_lora")
    summary, _, _ = measured(case)
    model = validate.build_model(case)
    weights = linear_weights(model)
    frozen = sum(i * o for _, i, o, t in weights if not t)
    trainable = sum(i * o for _, i, o, t in weights if t)
    # The embedding is frozen, so layer 0's input needs no gradient: its q/k/v base weights get no
    # backward GEMM at all and its lora_A no input-gradient GEMM.
    first = [(n, i, o) for n, i, o, _ in weights if ".layers.0.self_attn." in n
             and (n.endswith(("q_proj.base_layer.weight", "v_proj.base_layer.weight", "k_proj.weight"))
                  or "lora_A" in n)]
    assert len(first) == 5
    saved = 2 * case.tokens * sum(i * o for _, i, o in first)
    expected = case.tokens * (4 * frozen + 6 * trainable) + case.layers * attention_training(case) - saved
    assert summary["gemm_training_flops"] == expected
    assert validate.analytic_gemm(case).training == expected


def test_gradient_checkpointing_recompute_is_separate_and_matches():
    case = tiny("llama_checkpointing")
    plain = tiny("llama_full")
    summary, _, rec_gemm = measured(case)
    plain_summary, _, _ = measured(plain)
    assert summary["gemm_training_flops"] == plain_summary["gemm_training_flops"]  # recompute excluded
    expected = validate.analytic_gemm(case)
    assert rec_gemm == expected.recompute
    # non-reentrant checkpoint re-runs each layer up to its last saved tensor: everything but down_proj,
    # plus the attention forward; the fused backward's score product comes on top
    T, d, ff, L = case.tokens, case.hidden, case.intermediate, case.layers
    layer_forward = 2 * T * (4 * d * d + 3 * d * ff) + attention_training(case) // 3
    score = 2 * case.batch * case.heads * case.seq * (case.seq + 1) // 2 * case.head_dim
    assert rec_gemm == L * (layer_forward - 2 * T * ff * d + score)


def test_moe_counts_active_experts_from_the_routers_choices():
    case = tiny("mixtral_moe")
    summary, routed, _ = measured(case)
    assert len(routed) == case.layers
    rows = [sum(counts) for _, counts in routed]
    assert rows == [case.tokens * case.top_k] * case.layers  # every token goes to top_k experts
    assert summary["uncounted_ops"] == {}  # the router hook adds no op to the metered step
    assert summary["gemm_training_flops"] == validate.analytic_gemm(case, rows).training
    # active experts only: 6 x tokens x top_k x (3 d ff) per layer, not x num_experts
    d, ff = case.hidden, case.intermediate
    expert_gemm = 6 * case.tokens * case.top_k * 3 * d * ff * case.layers
    all_experts = dataclasses.replace(case, top_k=case.experts)
    full_rows = [case.tokens * case.experts] * case.layers
    assert (validate.analytic_gemm(all_experts, full_rows).training - validate.analytic_gemm(case, rows).training
            == expert_gemm * (case.experts - case.top_k) // case.top_k)


def test_gpt2_math_attention_and_tied_head():
    case = tiny("gpt2")
    summary, _, rec_gemm = measured(case)
    model = validate.build_model(case)
    T, d, V = case.tokens, case.hidden, case.vocab
    blocks = case.layers * (d * 3 * d + d * d + 2 * d * 4 * d)
    attention = case.layers * 3 * 2 * (2 * case.batch * case.heads * case.seq ** 2 * case.head_dim)
    expected = 6 * T * (blocks + d * V) + attention  # the tied LM head still runs its GEMMs
    assert summary["gemm_training_flops"] == expected
    assert rec_gemm == 0
    # ... but Hugging Face's N drops it with the embedding
    assert validate.hf_parameter_count(model) == sum(p.numel() for p in model.parameters()) - V * d - 1024 * d


def test_formula_columns_match_their_published_forms():
    case = tiny("gpt2")
    n = 12345
    assert validate.six_nd(n, case.tokens) == 6 * n * case.tokens
    h, s, L, V, B = case.hidden, case.seq, case.layers, case.vocab, case.batch
    assert validate.palm(case, n) == case.tokens * (6 * n + 12 * L * case.heads * (h // case.heads) * s)
    # Narayanan et al. (2021): 72 B s L h^2 (1 + s / (6 h) + V / (12 L h)) for GPT (MHA, 4h MLP)
    assert validate.megatron(case) == pytest.approx(72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h)),
                                                    abs=1)


def test_six_nd_is_hugging_face_trainer_estimate():
    import torch
    import transformers

    case = tiny("llama_lora")
    model = validate.build_model(case)
    ids = torch.zeros(case.batch, case.seq, dtype=torch.long)
    hf = transformers.Trainer.floating_point_ops(types.SimpleNamespace(model=model), {"input_ids": ids})
    assert validate.six_nd(validate.hf_parameter_count(model), case.tokens) == hf


def test_run_case_fills_every_column(tmp_path):
    case = tiny("llama_full")
    row = validate.run_case(case, repeats=1, cpu_peak=1e10, backend="dispatch")
    assert set(validate.COLUMNS) <= set(row)
    assert row["flopcount_gemm"] == row["analytic_gemm"]
    assert row["flopcount_recompute_gemm"] == row["analytic_recompute_gemm"]
    # torch's counter sees the linear GEMMs but 0 for CPU fused attention
    assert row["flopcountermode"] == row["flopcount_gemm"] - case.layers * attention_training(case)
    assert row["profiler"] > 0 and row["step_seconds"] > 0
    assert row["six_nd_vs_flopcount"] == pytest.approx(row["six_nd"] / row["flopcount_training"] - 1, abs=1e-4)
    csv_path = tmp_path / "v.csv"
    validate.write_csv([row], csv_path)
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header == validate.COLUMNS


def test_results_section_is_replaced_and_other_sections_kept(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Overhead\n\nkeep me\n\n## Validation\n\nold intro\n")
    validate.update_results(results, f"{validate.SECTION_BEGIN}\nfirst\n{validate.SECTION_END}")
    validate.update_results(results, f"{validate.SECTION_BEGIN}\nsecond\n{validate.SECTION_END}")
    text = results.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count("## Validation") == 1 and text.count(validate.SECTION_BEGIN) == 1


def test_unknown_case_is_a_one_line_error():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "validate.py"), "--cases", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown case(s) nope" in done.stderr
    assert "Traceback" not in done.stderr


def test_throughput_arithmetic():
    assert throughput.mfu(500e12, 1.0, throughput.peak_flops_per_s("H100-SXM")) == pytest.approx(500 / 989.4)
    assert throughput.mfu(8e15, 2.0, 1e15, devices=8) == pytest.approx(0.5)
    assert throughput.hardware_estimate(8, 3600.0, 989.4e12, 0.4) == pytest.approx(8 * 3600 * 989.4e12 * 0.4)
    with pytest.raises(ValueError):
        throughput.peak_flops_per_s("A100-SXM", "fp8")
    with pytest.raises(KeyError):
        throughput.peak_flops_per_s("TPU-v9")
    for peak in throughput.PEAKS_TFLOPS.values():  # dense tensor >= FP32 vector, FP8 = 2 x BF16
        assert peak.bf16 > peak.fp32 and peak.source
        assert peak.fp8 is None or peak.fp8 == pytest.approx(2 * peak.bf16, rel=0.02)


@pytest.mark.parametrize("name", ["llama_lora", "llama_gqa", "mixtral_moe", "gpt2"])
def test_closed_form_parameter_count_matches_hugging_face(name):
    """The published-shapes table uses N from shapes alone; it must be what num_parameters() says."""
    case = tiny(name)
    model = validate.build_model(case)
    assert validate.hf_parameter_count_closed_form(case) == validate.hf_parameter_count(model)
