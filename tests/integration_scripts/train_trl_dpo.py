"""A TRL DPO script that knows nothing about flopcount (for `flopcount run` tests).

Tiny Llama policy and reference built from a config (hidden 64, 4 heads of 16, 2 KV heads, MLP 96,
vocab 128, 2 layers), a word-level tokenizer built in place; 2 DPO steps, then evaluate(). It
records every model call (batch, length, grad enabled, inside evaluate()) to SHAPES_FILE."""
import json
import os

import datasets
import torch
import transformers
import trl
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 128


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", tie_word_embeddings=False))


backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t2", unk_token="t1")
pairs = {"prompt": ["t3 t4 t5", "t6 t7"], "chosen": [" t8 t9", " t10"], "rejected": [" t11", " t12 t13 t14"]}
data = datasets.Dataset.from_dict(pairs)
policy, reference = tiny_llama(), tiny_llama()
calls, evaluating = {"policy": [], "reference": []}, [False]


def recorder(name):
    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls[name].append([int(ids.shape[0]), int(ids.shape[1]), torch.is_grad_enabled(), evaluating[0],
                            bool(kwargs.get("fused_lm_head"))])
    return pre


policy.register_forward_pre_hook(recorder("policy"), with_kwargs=True)
reference.register_forward_pre_hook(recorder("reference"), with_kwargs=True)
config = trl.DPOConfig(output_dir=os.environ.get("CKPT", "ckpt"), max_steps=2, per_device_train_batch_size=2,
                       per_device_eval_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                       disable_tqdm=True, dataloader_num_workers=0)
trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=data, eval_dataset=data,
                         processing_class=tok)
trainer.train()
evaluating[0] = True
trainer.evaluate()
with open(os.environ["SHAPES_FILE"], "w") as f:
    json.dump(calls, f)
