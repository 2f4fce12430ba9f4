"""TRL's vLLM rollouts (``use_vllm=True``, server mode): no capture path sees them, so their FLOPs
are derived from the token counts that come back through TRL's client interface.

vLLM cannot run here. A real GRPOTrainer drives TRL's real ``VLLMGeneration`` (weight sync,
sampling parameters, the client call, slicing, logprobs); only the server connection is replaced
by a stand-in client with ``VLLMClient``'s methods and signatures, which answers with recorded
completions of chosen lengths. Online DPO's server path (its own ``_generate_vllm_server``) is
driven the same way on a real OnlineDPOTrainer. Closed form per completion of C tokens after a prompt of P: a
causal forward over N = P + C - 1 positions keeping C logits: matmul 2*(N*LW + C*HEAD),
attention 2 * N(N+1)/2 pairs * (16 + 16) per head * 4 heads * 2 layers.
"""
from __future__ import annotations

import contextlib

import pyarrow.parquet as pq
import pytest

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from test_trl_phases import HEAD, LW, Shapes, common, completion_reward, tokenizer  # noqa: E402

import flopcount  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from flopcount.integrations.hf import FlopMeterCallback  # noqa: E402

vllm_generation = pytest.importorskip("trl.generation.vllm_generation")
HEADS, LAYERS, D = 4, 2, 16


class StandInClient:
    """The methods of ``trl.generation.vllm_client.VLLMClient`` that ``VLLMGeneration`` calls in
    server mode, with their signatures; ``generate`` answers with completions of recorded lengths
    (the i-th completion has ``lengths[i]`` tokens) and records what it was asked."""

    def __init__(self, lengths) -> None:
        self.lengths = list(lengths)
        self.asked: list[tuple[list[int], int, list[int]]] = []  # (prompt lengths, n, completion lengths)
        self.weights_received = 0

    def init_communicator(self, device=0):
        pass

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata, params):
        self.weights_received += sum(1 for _ in params)

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, features=None, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                 min_p=0.0, max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None):
        completions = []
        for _ in prompts:
            for _ in range(n):
                length = self.lengths.pop(0)
                assert length <= max_tokens
                completions.append([3 + i % 7 for i in range(length)])
        self.asked.append(([len(p) for p in prompts], n, [len(c) for c in completions]))
        return {"prompt_ids": [list(p) for p in prompts], "completion_ids": completions,
                "logprobs": [[[-1.0]] * len(c) for c in completions],
                "logprob_token_ids": [[[t] for t in c] for c in completions]}


def stand_in_generation(client):
    class StandInServer(vllm_generation.VLLMGeneration):
        def _init_vllm(self):  # the server connection is the only part replaced
            self.vllm_client = client
    return StandInServer


def grpo(tmp_path, monkeypatch, client, callback, **options):
    import trl.trainer.grpo_trainer as grpo_trainer

    monkeypatch.setattr(grpo_trainer, "VLLMGeneration", stand_in_generation(client))
    tiny_llama().save_pretrained(tmp_path / "policy")
    config = trl.GRPOConfig(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                            beta=0.0, use_vllm=True, vllm_mode="server", vllm_importance_sampling_correction=False,
                            **common(tmp_path))
    prompts = datasets.Dataset.from_dict({"prompt": ["t3 t4 t5", "t6 t7 t8 t9"]})
    return trl.GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[completion_reward], args=config,
                           train_dataset=prompts, processing_class=tokenizer(), callbacks=[callback], **options)


def closed_form(asked) -> tuple[int, int, int]:
    """(matmul, attention, completions) of the rollouts the client answered."""
    matmul = attention = count = 0
    for prompt_lengths, n, completion_lengths in asked:
        prompts = [p for p in prompt_lengths for _ in range(n)]
        for p, c in zip(prompts, completion_lengths):
            positions = p + c - 1
            matmul += 2 * (positions * LW + c * HEAD)
            attention += 2 * (positions * (positions + 1) // 2) * (D + D) * HEADS * LAYERS
            count += 1
    return matmul, attention, count


def real_forward_by_category(asked) -> dict:
    """FLOPs per category of real CPU forwards of the tiny policy over P + C - 1 positions keeping
    C logits, one per completion, metered on their own."""
    import torch

    model, out = tiny_llama().eval(), {}
    for prompt_lengths, n, completion_lengths in asked:
        for p, c in zip([p for p in prompt_lengths for _ in range(n)], completion_lengths):
            with torch.no_grad(), flopcount.meter(backend="dispatch", warn=False) as m:
                model(input_ids=torch.randint(3, 100, (1, p + c - 1)), logits_to_keep=c, use_cache=False)
            for category, flops in m.summary()["by_category"].items():
                out[category] = out.get(category, 0) + flops
    return {k: v for k, v in out.items() if v}


def test_grpo_vllm_rollouts_are_derived_generation(tmp_path, monkeypatch):
    client = StandInClient([3, 1, 4, 2])
    callback = FlopMeterCallback(out=str(tmp_path / "trace"), backend="dispatch", warn=False)
    trainer = grpo(tmp_path, monkeypatch, client, callback)
    policy = Shapes(trainer.model)
    trainer.train()
    summary = callback.summary()
    assert summary["steps"] == trainer.state.global_step == 2
    assert client.weights_received > 0  # TRL's weight sync went through the client
    assert [a[2] for a in client.asked] == [[3, 1], [4, 2]]
    matmul, attention, completions = closed_form(client.asked)
    cats = summary["by_phase_category"]["generation"]
    assert (cats["matmul"], cats["attention"]) == (matmul, attention)
    # No in-process generation ran (the policy ran only with grad): the GEMM work in generation is
    # all derived; TRL's own bookkeeping of the completions (masks, comparisons) is captured there too.
    assert all(grad for _, _, grad, _ in policy.calls)
    assert summary["by_op"]["derived.vllm.generate"]["calls"] == completions
    rows = pq.read_table(tmp_path / "trace" / "breakdown").to_pandas()
    derived = rows[(rows.kind == "flops") & rows.op.str.startswith("derived.")]
    assert set(derived.phase) == {"generation"} and derived.training.all()  # marked derived, counted as training
    by_category = derived.groupby("category").value.sum().to_dict()
    assert (by_category["matmul"], by_category["attention"]) == (matmul, attention)
    # Every category, vector work included, is what a real CPU forward over the same positions counts.
    assert by_category == real_forward_by_category(client.asked)
    split = summary["method"]["training_split"]
    assert split["derived_flops"] == summary["by_op"]["derived.vllm.generate"]["flops"] == sum(by_category.values())
    assert "derived" in summary["method"]["uncertainty"] and not summary["uncounted_ops"]
    assert split["no_grad_phases"]["generation"] == summary["by_phase"]["generation"]
    assert summary["training_flops"] == split["gradient_work"] + split["no_grad_training_work"]
    assert flopcount.summarize(str(tmp_path / "trace"))["by_op"]["derived.vllm.generate"]["calls"] == completions


def test_grpo_vllm_rollouts_without_token_counts_are_uncounted(tmp_path, monkeypatch):
    """A custom rollout function that calls the engine itself: no token counts reach flopcount."""
    client = StandInClient([2, 2, 2, 2])

    def rollout(prompts, trainer):
        ids = [trainer.processing_class(p)["input_ids"] for p in prompts]
        out = trainer.vllm_generation.vllm_client.generate(prompts=ids[::2], n=2, max_tokens=4)
        return {"prompt_ids": ids, "completion_ids": out["completion_ids"], "logprobs": out["logprobs"]}

    callback = FlopMeterCallback(backend="dispatch", warn=False)
    trainer = grpo(tmp_path, monkeypatch, client, callback, rollout_func=rollout)
    trainer.train()
    summary = callback.summary()
    assert summary["uncounted_ops"] == {"vllm.generate": 2}  # one per generation call, never a silent zero
    assert "vllm.generate" in summary["method"]["uncertainty"]
    assert "derived.vllm.generate" not in summary["by_op"]


class StandInTextServer(StandInClient):
    """``VLLMClient`` as online DPO's server mode uses it: text prompts, which the server tokenizes
    itself (each prompt alone, no padding: what its engine runs), and one grouped weight update."""

    def __init__(self, lengths, tok) -> None:
        super().__init__(lengths)
        self.tok = tok

    @contextlib.contextmanager
    def weight_update(self):
        yield

    def update_named_param(self, name, weights):
        self.weights_received += 1

    def generate(self, prompts, **kwargs):
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return super().generate(ids, **kwargs)


@pytest.mark.parametrize("backend", ["dispatch", "native"], indirect=True)
def test_online_dpo_vllm_server_rollouts_count_no_pad_tokens(tmp_path, backend):
    """Online DPO's ``_generate_vllm_server`` (TRL's real method, a real trainer; only the server
    is a stand-in) re-tokenises the prompts locally with left padding for the ids it returns. The
    server ran each prompt unpadded: the derived rollouts count its real tokens, never the pads."""
    from types import SimpleNamespace

    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from flopcount.integrations import tags

    tags.install()
    tok = tokenizer()
    prompts = ["t3 t4 t5 t6 t7", "t8", "t9 t3"]  # 5, 1 and 2 tokens: 0, 4 and 3 pads on the left
    config = OnlineDPOConfig(max_steps=1, per_device_train_batch_size=3, max_new_tokens=3, **common(tmp_path))
    trainer = OnlineDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), reward_funcs=[completion_reward],
                               args=config, train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                               processing_class=tok)
    client = StandInTextServer([3, 1, 2, 3, 1, 2], tok)
    # What use_vllm=True, vllm_mode="server" sets up (vLLM cannot be installed here): the client,
    # and the sampling parameters' max_tokens (vLLM's SamplingParams).
    trainer.vllm_mode, trainer.vllm_client = "server", client
    trainer.generation_config = SimpleNamespace(max_tokens=3)
    with flopcount.meter(backend=backend, warn=False) as m:
        completion_ids, prompt_ids = trainer._generate_vllm_server(prompts)
    # TRL returns the prompts padded on the left to the longest (5 tokens), two copies each.
    assert [len(p) for p in prompt_ids] == [5] * 6 and prompt_ids[1][:4] == [tok.pad_token_id] * 4
    # The closed form's prompt lengths are the non-pad tokens of that batch (its attention mask).
    padded = tok(prompts, padding=True, padding_side="left", add_special_tokens=False)
    real = [sum(mask) for mask in padded["attention_mask"]]
    assert real == [5, 1, 2] and client.weights_received > 0
    assert client.asked == [(real, 2, [3, 1, 2, 3, 1, 2])]
    matmul, attention, completions = closed_form(client.asked)
    summary = m.summary()
    cats = summary["by_phase_category"]["generation"]
    assert (cats["matmul"], cats["attention"]) == (matmul, attention)
    assert summary["by_op"]["derived.vllm.generate"]["calls"] == completions == len(completion_ids) == 6
    assert not summary["uncounted_ops"]
