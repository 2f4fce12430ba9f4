"""FlopMeterCallback with a real Trainer on CPU: padded batches, eval apart, logs, LoRA, budget.

Closed forms (tiny Llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 96, vocab 128, 2 layers):
every nn.Linear multiplies each position once, so a forward's matmul FLOPs are 2 x positions x W,
W = the Linear weights' elements; padding positions are computed too (tokens are not positions).
"""
from __future__ import annotations

import os

import pytest
import torch

import flopcount

transformers = pytest.importorskip("transformers")

from conftest import tiny_llama  # noqa: E402
from flopcount.integrations.hf import FlopMeterCallback  # noqa: E402
from flopcount.trace.reader import read_table  # noqa: E402

HIDDEN, KV, MLP, VOCAB, LAYERS = 64, 2 * 16, 96, 128, 2
LAYER_W = HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + HIDDEN * MLP * 3  # q, o; k, v; gate, up, down
W = LAYERS * LAYER_W + HIDDEN * VOCAB  # + lm_head
SEQ = 12
LENGTHS = [12, 7, 9, 5, 12, 3]  # real tokens per sample; the rest of SEQ is padding


class PaddedDataset(torch.utils.data.Dataset):
    """Right-padded causal-LM samples of length SEQ with LENGTHS[i] real tokens."""

    def __init__(self, lengths) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        n = self.lengths[i]
        ids = torch.randint(1, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        ids[n:] = 0
        labels = ids.clone()
        labels[n:] = -100
        return {"input_ids": ids, "attention_mask": (torch.arange(SEQ) < n).long(), "labels": labels}


def make_trainer(model, tmp_path, callback, *, max_steps=3, batch=2, eval_lengths=None, **args):
    options = dict(output_dir=str(tmp_path / "ckpt"), max_steps=max_steps, per_device_train_batch_size=batch,
                   per_device_eval_batch_size=batch, report_to=[], use_cpu=True, logging_steps=1,
                   save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    if eval_lengths:
        options.update(eval_strategy="steps", eval_steps=2)
    options.update(args)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**options),
                                train_dataset=PaddedDataset(LENGTHS),
                                eval_dataset=PaddedDataset(eval_lengths) if eval_lengths else None,
                                callbacks=[callback])


def test_trainer_padded_batches_tokens_eval_and_logs(tmp_path):
    callback = FlopMeterCallback(out=str(tmp_path / "trace"), backend="dispatch")
    trainer = make_trainer(tiny_llama(), tmp_path, callback, eval_lengths=[10, 4])
    trainer.train()
    summary = callback.summary()
    # Tokens are the attention masks' sum, not the padded positions (6 samples x 12).
    assert summary["tokens"] == sum(LENGTHS) == 48
    assert summary["samples"] == len(LENGTHS)
    positions = len(LENGTHS) * SEQ
    cats = summary["by_phase_category"]
    assert cats["forward"]["matmul"] == 2 * positions * W
    assert cats["backward"]["matmul"] == 2 * cats["forward"]["matmul"]  # input and weight gradients
    # Two evaluations (after steps 2 and 3) of 2 samples, in phase eval, outside training_flops.
    assert cats["eval"]["matmul"] == 2 * (2 * SEQ) * W * 2
    assert summary["training_flops"] == sum(f for p in ("forward", "backward", "optimizer", "no_grad_training")
                                            for f in cats.get(p, {}).values())
    # Logs: the cumulative training FLOPs of the closed steps, and its share of the threshold.
    steps = read_table(str(tmp_path / "trace"), "steps").to_pandas().sort_values("step")
    cumulative = steps["training_flops"].cumsum().tolist()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert [h["flopcount/training_flops"] for h in logged] == [float(c) for c in cumulative[:3]]
    for h in logged:
        assert h["flopcount/threshold_ratio"] == pytest.approx(h["flopcount/training_flops"] / (1e23 / 3), rel=1e-12)
    assert type(trainer.callback_handler.callbacks[0]) is FlopMeterCallback  # ahead of the reporters


def test_lora_through_the_callback_uses_the_registry_base_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    model.config._name_or_path = "meta-llama/Llama-3.1-8B"  # as from_pretrained would set it
    rank = 4
    lora = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    callback = FlopMeterCallback(backend="dispatch")
    make_trainer(lora, tmp_path, callback, max_steps=3).train()  # one epoch
    summary = callback.summary()
    positions = len(LENGTHS) * SEQ
    lora_a = LAYERS * 2 * HIDDEN * rank            # A of q_proj and v_proj: 64 -> 4
    lora_b = LAYERS * (rank * HIDDEN + rank * KV)  # B of q_proj (4 -> 64) and v_proj (4 -> 32)
    cats = summary["by_phase_category"]
    assert cats["forward"]["matmul"] == 2 * positions * (W + lora_a + lora_b)
    # Backward: weight gradients only for the adapters; input gradients for every Linear whose
    # input needs one: all of layer 1 and lm_head, layer 0 from o_proj on, and layer 0's B matrices
    # (layer 0's q/k/v and A read the frozen embedding's output, which needs no gradient).
    weight_grads = lora_a + lora_b
    input_grads = (HIDDEN * VOCAB + LAYER_W + lora_a // 2 + lora_b // 2
                   + HIDDEN * HIDDEN + HIDDEN * MLP * 3 + lora_b // 2)
    assert cats["backward"]["matmul"] == 2 * positions * (weight_grads + input_grads)
    assert summary["tokens"] == sum(LENGTHS)
    assert summary["base_model"] == "meta-llama/Llama-3.1-8B"
    assert summary["compliance"]["threshold_basis"] == "base_model_compute"


def test_budget_saves_a_checkpoint_and_stops_before_crossing(tmp_path):
    # Equal-length batches make every step's work equal; measure one step, budget 2.5 of them.
    probe = FlopMeterCallback(backend="dispatch")
    make_trainer(tiny_llama(), tmp_path / "probe", probe, max_steps=1).train()
    per_step = probe.summary()["training_flops"]
    budget = int(2.5 * per_step)
    callback = FlopMeterCallback(backend="dispatch", budget=budget, budget_warn_at=0.3)
    trainer = make_trainer(tiny_llama(), tmp_path, callback, max_steps=6)
    with pytest.warns(UserWarning, match="of the budget"):
        trainer.train()
    total = callback.summary()["training_flops"]
    assert callback.stopped_by_budget
    assert trainer.state.global_step == 2  # a third step would have crossed
    assert total < budget <= total + per_step
    assert os.path.isdir(tmp_path / "ckpt" / "checkpoint-2")


def test_bad_budget_is_a_one_line_error():
    with pytest.raises(ValueError, match="budget=-1 must be a fraction"):
        FlopMeterCallback(budget=-1)


def test_trl_sft_trainer_counts_real_tokens(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models

    # A word-level tokenizer built in place (no hub): ids 0..127, pad 0, eos 2.
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), pad_token="t0", eos_token="t2",
        unk_token="t1")
    lengths = [12, 7, 9, 5]
    train = datasets.Dataset.from_dict({"input_ids": [list(range(3, 3 + n)) for n in lengths]})
    callback = FlopMeterCallback(out=str(tmp_path / "trace"), backend="dispatch")
    config = trl.SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=2, per_device_train_batch_size=2,
                           report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=tiny_llama(), args=config, train_dataset=train, processing_class=tokenizer,
                             callbacks=[callback])
    trainer.train()
    summary = callback.summary()
    assert summary["tokens"] == sum(lengths)  # padded batches: the masks' sum, as TRL's num_tokens says
    assert trainer.state.log_history[1]["num_tokens"] == sum(lengths)
    steps = read_table(str(tmp_path / "trace"), "steps").to_pandas().sort_values("step")
    assert trainer.state.log_history[1]["flopcount/training_flops"] == float(steps["training_flops"][:2].sum())
    assert summary["steps"] == trainer.state.global_step == 2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_steps_are_the_trainers_global_step(tmp_path, accumulation):
    """max_steps=2 (with gradient accumulation: 2 micro-batches per step) and an evaluation after
    step 2: steps == global_step; the evaluation and the loss bookkeeping after the last step are
    trailing work, counted in their phases."""
    callback = FlopMeterCallback(out=str(tmp_path / "trace"), backend="dispatch")
    trainer = make_trainer(tiny_llama(), tmp_path, callback, max_steps=2, gradient_accumulation_steps=accumulation,
                           eval_lengths=[10, 4])
    trainer.train()
    summary = callback.summary()
    assert trainer.state.global_step == 2
    assert summary["steps"] == trainer.state.global_step
    assert flopcount.summarize(str(tmp_path / "trace"))["steps"] == 2
    # Batches of 2 of the 6 samples: steps of 1 batch, or of 2 batches then the epoch's last one.
    samples = {1: 4, 2: 6}[accumulation]
    assert summary["samples"] == samples
    cats = summary["by_phase_category"]
    positions = samples * SEQ
    assert cats["forward"]["matmul"] == 2 * positions * W
    assert cats["eval"]["matmul"] == 2 * (2 * SEQ) * W  # one evaluation of 2 samples, after the last step
    rows = read_table(str(tmp_path / "trace"), "steps").to_pandas()
    assert rows["trailing"].tolist() == [False, False, True]
    assert rows["cat_matmul"].tolist()[-1] == 2 * (2 * SEQ) * W
    assert summary["trailing_flops"] == rows["hardware_flops"].tolist()[-1]
