"""No-grad training work with real TRL trainers on CPU: DPO's reference, GRPO's and RLOO's rollouts
and GKD's and DistillationTrainer's teacher and on-policy generation are training compute, in their
own phases (the DistillationTrainer's teacher LM head too, projected by TRL's chunked divergence
outside the teacher's call); evaluate() is eval.

Closed forms (tiny Llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 96, vocab 128, 2 layers): a
forward of B sequences of L positions multiplies each position once by every Linear of the
layers, 2*B*L*LW FLOPs, LW = the layers' Linear weights; the LM head projects every position
(TRL's fused LM head: every position but the last), 2*B*L*64*128. The lengths are those the
trainers really ran, recorded by forward pre-hooks on the models.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import flopcount  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from flopcount.integrations.hf import FlopMeterCallback  # noqa: E402

HIDDEN, KV, MLP, VOCAB, LAYERS = 64, 2 * 16, 96, 128, 2
LW = LAYERS * (HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + HIDDEN * MLP * 3)  # q, o; k, v; gate, up, down
HEAD = HIDDEN * VOCAB


def tokenizer():
    """A word-level tokenizer built in place (no hub): "t5" is id 5; pad 0, eos 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2",
                                                unk_token="t1")


class Shapes:
    """Records (batch, length, grad enabled, matmul FLOPs) of every call of a causal LM: the layers
    at every position; the LM head at every position, at the last ``logits_to_keep`` (generate),
    or, with TRL's fused LM head, at every position but the last. ``head``: the output layer's
    weights (a sequence classifier's score layer: 64 x 1)."""

    def __init__(self, model, head: int = HEAD) -> None:
        self.calls: list[tuple[int, int, bool, int]] = []
        self.head = head
        model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        b, n = int(ids.shape[0]), int(ids.shape[1])
        keep = kwargs.get("logits_to_keep") or 0
        positions = n - 1 if kwargs.get("fused_lm_head") else (min(keep, n) if keep else n)
        self.calls.append((b, n, torch.is_grad_enabled(), 2 * b * (n * LW + positions * self.head)))

    def matmul(self, grad=None) -> int:
        return sum(f for _, _, g, f in self.calls if grad is None or g == grad)


def common(tmp_path, **options):
    return dict(output_dir=str(tmp_path / "ckpt"), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0, **options)


def test_dpo_reference_work_is_training_and_evaluate_is_eval(tmp_path):
    pairs = {"prompt": ["t3 t4 t5", "t6 t7"], "chosen": [" t8 t9", " t10"], "rejected": [" t11", " t12 t13 t14"]}
    train, held_out = datasets.Dataset.from_dict(pairs), datasets.Dataset.from_dict(
        {k: v[:1] for k, v in pairs.items()})
    policy, reference = tiny_llama(), tiny_llama()
    policy_calls, reference_calls = Shapes(policy), Shapes(reference)
    callback = FlopMeterCallback(backend="dispatch", warn=False)
    # precompute_ref_log_probs: the reference pass over the training set runs in __init__,
    # before training, and still counts; the one over the evaluation set is evaluation, as is
    # evaluate() after each step.
    config = trl.DPOConfig(max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                           precompute_ref_log_probs=True, eval_strategy="steps", eval_steps=1, **common(tmp_path))
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train,
                             eval_dataset=held_out, processing_class=tokenizer(), callbacks=[callback])
    trainer.train()
    summary = callback.summary()
    assert summary["steps"] == trainer.state.global_step == 2
    cats = summary["by_phase_category"]
    # The reference model ran twice: the training set's pass (training) and the evaluation set's.
    train_pass, eval_pass = reference_calls.calls
    assert (train_pass[0], eval_pass[0]) == (4, 2)  # chosen + rejected of 2 pairs, of 1 pair
    assert cats["reference"]["matmul"] == train_pass[3]
    # The policy without grad ran only in the two evaluate() calls.
    assert len([c for c in policy_calls.calls if not c[2]]) == 2
    assert cats["eval"]["matmul"] == eval_pass[3] + policy_calls.matmul(grad=False)
    assert cats["forward"]["matmul"] == policy_calls.matmul(grad=True)
    assert cats["backward"]["matmul"] > cats["forward"]["matmul"]
    # training_flops holds the reference work; the split says so, and why.
    split = summary["method"]["training_split"]
    assert split["no_grad_phases"]["reference"] == summary["by_phase"]["reference"]
    assert summary["training_flops"] == split["gradient_work"] + split["no_grad_training_work"]
    assert "reference" in summary["method"]["phases_included"]
    assert "eval" not in summary["method"]["phases_included"]


def completion_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_grpo_rollouts_reference_and_reward_model_are_training(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "policy")  # a local path: GRPO builds its reference from it
    scorer = transformers.LlamaForSequenceClassification(tiny_llama().config.__class__(
        **{**tiny_llama().config.to_dict(), "num_labels": 1, "pad_token_id": 0}))
    callback = FlopMeterCallback(backend="dispatch", warn=False)
    config = trl.GRPOConfig(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                            beta=0.1, **common(tmp_path))
    prompts = datasets.Dataset.from_dict({"prompt": ["t3 t4 t5", "t6 t7 t8 t9"]})
    trainer = trl.GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=[completion_reward, scorer], args=config,
                              train_dataset=prompts, processing_class=tokenizer(),
                              reward_processing_classes=[None, tokenizer()], callbacks=[callback])
    policy, reference = Shapes(trainer.model), Shapes(trainer.ref_model)
    reward = Shapes(scorer, head=HIDDEN * 1)
    trainer.train()
    summary = callback.summary()
    assert summary["steps"] == trainer.state.global_step == 2
    cats = summary["by_phase_category"]
    # Rollouts: generate()'s prefill and decoding calls, at the lengths really generated.
    rollouts = [c for c in policy.calls if not c[2]]
    assert len(rollouts) >= 2 * 2 and {c[1] for c in rollouts[1:]} >= {1}  # decoding: one position per call
    assert cats["generation"]["matmul"] == policy.matmul(grad=False)
    assert cats["forward"]["matmul"] == policy.matmul(grad=True)
    assert cats["reference"]["matmul"] == reference.matmul() > 0
    # The reward model scores under torch.inference_mode (aten.linear is seen whole there).
    assert cats["reward"]["matmul"] == reward.matmul() > 0
    split = summary["method"]["training_split"]
    assert set(split["no_grad_phases"]) >= {"generation", "reference", "reward"}
    assert summary["training_flops"] == split["gradient_work"] + split["no_grad_training_work"]
    assert "eval" not in summary["by_phase"]


class PhaseShapes(Shapes):
    """Shapes that also record whether the call ran inside the trainer's evaluate()."""

    def __init__(self, model, evaluating: list, head: int = HEAD, layers: int = LW) -> None:
        super().__init__(model, head)
        self.evaluating, self.layers, self.in_eval = evaluating, layers, []

    def _pre(self, module, args, kwargs):
        super()._pre(module, args, kwargs)
        b, n, grad, _ = self.calls[-1]
        keep = kwargs.get("logits_to_keep") or 0
        positions = n - 1 if kwargs.get("fused_lm_head") else (min(keep, n) if keep else n)
        self.calls[-1] = (b, n, grad, 2 * b * (n * self.layers + positions * self.head))
        self.in_eval.append(self.evaluating[0])

    def matmul_where(self, grad: bool, in_eval: bool) -> int:
        return sum(c[3] for c, e in zip(self.calls, self.in_eval) if c[2] == grad and e == in_eval)


def watch_evaluate(trainer) -> list:
    """[True] while trainer.evaluate() runs (the Trainer calls it through the instance)."""
    flag, original = [False], trainer.evaluate

    def evaluate(*args, **kwargs):
        flag[0] = True
        try:
            return original(*args, **kwargs)
        finally:
            flag[0] = False
    trainer.evaluate = evaluate
    return flag


def test_gkd_teacher_and_on_policy_generation_are_training(tmp_path):
    """GKD (TRL's distillation trainer with a full teacher forward): every step generates on-policy
    with the student (lmbda=1), the teacher scores the generated sequences without grad, the
    student trains on them; evaluate() after each step runs student and teacher: eval only."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    chats = [[{"role": "user", "content": "t3 t4"}, {"role": "assistant", "content": "t5 t6"}],
             [{"role": "user", "content": "t7 t8 t9"}, {"role": "assistant", "content": "t10"}]]
    data = datasets.Dataset.from_dict({"messages": chats})
    tok = tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    student, teacher = tiny_llama(), tiny_llama(hidden_size=32, intermediate_size=48)  # a smaller teacher
    callback = FlopMeterCallback(backend="dispatch", warn=False)
    config = GKDConfig(max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2, lmbda=1.0,
                       temperature=0.9, max_new_tokens=3, eval_strategy="steps", eval_steps=1, **common(tmp_path))
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                         eval_dataset=data.select([0]), processing_class=tok, callbacks=[callback])
    evaluating = watch_evaluate(trainer)
    # The teacher: hidden 32 in 4 heads of 8 (q, o 32x32; k, v 32x16 for 2 KV heads), MLP 48.
    teacher_layers = LAYERS * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 48 * 3)
    s_calls = PhaseShapes(trainer.model, evaluating)
    t_calls = PhaseShapes(trainer.teacher_model, evaluating, head=32 * VOCAB, layers=teacher_layers)
    trainer.train()
    summary = callback.summary()
    assert summary["steps"] == trainer.state.global_step == 2
    cats = summary["by_phase_category"]
    # Rollouts: the student's no-grad calls in the training loop, prefill then one position per call.
    rollouts = [c for c, e in zip(s_calls.calls, s_calls.in_eval) if not c[2] and not e]
    assert len(rollouts) >= 2 * 2 and {c[1] for c in rollouts[1:]} >= {1}
    assert cats["generation"]["matmul"] == s_calls.matmul_where(grad=False, in_eval=False)
    assert cats["teacher"]["matmul"] == t_calls.matmul_where(grad=False, in_eval=False) > 0
    assert cats["forward"]["matmul"] == s_calls.matmul_where(grad=True, in_eval=False)
    # evaluate() ran after each step, student and teacher once each: all of it eval.
    assert t_calls.in_eval.count(True) == 2
    assert cats["eval"]["matmul"] == (s_calls.matmul_where(grad=False, in_eval=True)
                                      + t_calls.matmul_where(grad=False, in_eval=True))
    split = summary["method"]["training_split"]
    assert set(split["no_grad_phases"]) >= {"generation", "teacher"}
    assert summary["training_flops"] == split["gradient_work"] + split["no_grad_training_work"]
    assert "eval" not in summary["method"]["phases_included"]


def test_rloo_rollouts_and_reference_are_training(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "policy")
    callback = FlopMeterCallback(backend="dispatch", warn=False)
    config = trl.RLOOConfig(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=3,
                            beta=0.1, **common(tmp_path))
    prompts = datasets.Dataset.from_dict({"prompt": ["t3 t4 t5", "t6 t7"]})
    trainer = trl.RLOOTrainer(model=str(tmp_path / "policy"), reward_funcs=[completion_reward], args=config,
                              train_dataset=prompts, processing_class=tokenizer(), callbacks=[callback])
    policy, reference = Shapes(trainer.model), Shapes(trainer.ref_model)
    trainer.train()
    assert_rollouts_and_reference(callback.summary(), trainer, policy, reference, min_rollouts=2 * 2)


def assert_rollouts_and_reference(summary, trainer, policy, reference, min_rollouts: int) -> None:
    """An on-policy trainer's 2 steps: rollouts (no-grad policy calls, decoding one position per
    call after the prompt) in ``generation``, the policy's gradient work in ``forward``, the
    reference model in ``reference``; all of it training, none of it eval."""
    assert summary["steps"] == trainer.state.global_step == 2
    cats = summary["by_phase_category"]
    rollouts = [c for c in policy.calls if not c[2]]
    assert len(rollouts) >= min_rollouts and {c[1] for c in rollouts[1:]} >= {1}
    assert cats["generation"]["matmul"] == policy.matmul(grad=False)
    assert cats["forward"]["matmul"] == policy.matmul(grad=True)
    assert cats["reference"]["matmul"] == reference.matmul() > 0
    split = summary["method"]["training_split"]
    assert set(split["no_grad_phases"]) >= {"generation", "reference"}
    assert summary["training_flops"] == split["gradient_work"] + split["no_grad_training_work"]
    assert "eval" not in summary["by_phase"]


def test_online_dpo_rollouts_and_reference_are_training(tmp_path):
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    policy_model, reference_model = tiny_llama(), tiny_llama()
    callback = FlopMeterCallback(backend="dispatch", warn=False)
    config = OnlineDPOConfig(max_steps=2, per_device_train_batch_size=2, max_new_tokens=3, **common(tmp_path))
    prompts = datasets.Dataset.from_dict({"prompt": ["t3 t4 t5", "t6 t7"]})
    trainer = OnlineDPOTrainer(model=policy_model, ref_model=reference_model, reward_funcs=[completion_reward],
                               args=config, train_dataset=prompts, processing_class=tokenizer(), callbacks=[callback])
    policy, reference = Shapes(trainer.model), Shapes(trainer.ref_model)
    trainer.train()
    assert_rollouts_and_reference(callback.summary(), trainer, policy, reference, min_rollouts=2)


class BackboneShapes:
    """Records (batch, length, grad enabled) of every call of a causal LM's backbone (TRL's
    DistillationTrainer runs the backbone alone and projects its hidden states itself) and the
    positions its own LM head projected in calls of the whole model (generate)."""

    def __init__(self, model) -> None:
        self.backbone: list[tuple[int, int, bool]] = []
        self.head_positions = 0
        model.base_model.register_forward_pre_hook(self._backbone, with_kwargs=True)
        model.register_forward_pre_hook(self._model, with_kwargs=True)

    def _backbone(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.backbone.append((int(ids.shape[0]), int(ids.shape[1]), torch.is_grad_enabled()))

    def _model(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):  # a call of the whole model (not TRL's forward redirection)
            b, n, keep = int(ids.shape[0]), int(ids.shape[1]), kwargs.get("logits_to_keep") or 0
            self.head_positions += b * (min(keep, n) if keep else n)

    def layers(self, grad: bool) -> list[tuple[int, int]]:
        return [(b, n) for b, n, g in self.backbone if g == grad]


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("backend", ["dispatch", "native"], indirect=True)
def test_distillation_teacher_lm_head_is_teacher_work(tmp_path, backend, beta):
    """TRL's DistillationTrainer: the student generates on-policy (generation), the teacher's
    backbone scores the sequences without grad, and TRL's chunked divergence projects both
    backbones' hidden states through their LM heads itself, outside either model's call. The
    teacher's LM head GEMM is teacher work; the backward's re-projection of both heads (the logits
    the forward computed, recomputed to save memory) is recompute, and so is the forward's second
    pass of the JSD (0 < beta < 1: the mixture needs both normalisers first); the gradients are
    backward.

    Closed forms: the layers 2*b*n*LW per backbone call (backward: twice the student's, input and
    weight gradients); the chunked LM heads at every completion position of the padded batch, N =
    B*K rows (on CPU TRL projects masked rows too), 2*N*H*V per head, the student's gradients
    4*N*64*V (hidden states and weight)."""
    student, teacher = tiny_llama(), tiny_llama(hidden_size=32, intermediate_size=48)  # a smaller teacher
    teacher_layers = LAYERS * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 48 * 3)
    callback = FlopMeterCallback(backend=backend, warn=False)
    config = trl.DistillationConfig(max_steps=2, per_device_train_batch_size=2, max_completion_length=3,
                                    temperature=0.9, beta=beta, **common(tmp_path))
    prompts = datasets.Dataset.from_dict({"prompt": ["t3 t4 t5", "t6 t7"]})
    trainer = trl.DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=prompts,
                                      processing_class=tokenizer(), callbacks=[callback])
    s_calls, t_calls = BackboneShapes(trainer.model), BackboneShapes(trainer.teacher_model)
    rows = []  # N = B*K of each loss: the completion positions the chunked divergence projected
    compute_loss = trainer._compute_loss

    def recording(student_model, inputs, num_items_in_batch):
        rows.append(int(inputs["completion_ids"].numel()))
        return compute_loss(student_model, inputs, num_items_in_batch)
    trainer._compute_loss = recording
    trainer.train()
    summary = callback.summary()
    assert summary["steps"] == trainer.state.global_step == 2
    cats = summary["by_phase_category"]
    n = sum(rows)
    assert len(rows) == 2 and n > 0
    generated = s_calls.layers(grad=False)
    assert len(generated) >= 2 and {length for _, length in generated[1:]} >= {1}  # prefill, then decoding
    assert cats["generation"]["matmul"] == (sum(2 * b * k * LW for b, k in generated)
                                            + 2 * s_calls.head_positions * HEAD)
    student_layers = sum(2 * b * k * LW for b, k in s_calls.layers(grad=True))
    assert len(s_calls.layers(grad=True)) == 2 and not t_calls.layers(grad=True)
    assert cats["forward"]["matmul"] == student_layers + 2 * n * HIDDEN * VOCAB
    assert cats["teacher"]["matmul"] == (sum(2 * b * k * teacher_layers for b, k in t_calls.layers(grad=False))
                                         + 2 * n * 32 * VOCAB)
    projections = 2 if 0 < beta < 1 else 1  # the backward's, and the JSD's second forward pass
    assert cats["recompute"]["matmul"] == projections * (2 * n * HIDDEN * VOCAB + 2 * n * 32 * VOCAB)
    assert cats["backward"]["matmul"] == 2 * student_layers + 4 * n * HIDDEN * VOCAB
    split = summary["method"]["training_split"]
    assert set(split["no_grad_phases"]) >= {"generation", "teacher"}
    assert summary["training_flops"] == split["gradient_work"] + split["no_grad_training_work"]
    assert "recompute" not in summary["method"]["phases_included"] and "eval" not in summary["by_phase"]
