"""`flopcount plan`: its arguments and its run (cli.py holds only add_plan/cmd_plan)."""
from __future__ import annotations

import argparse
import math

from ..errors import BadInput

EXIT_OK, EXIT_FINDING = 0, 1


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def add_arguments(parser, add_base_model, positive_int, flop_count) -> None:
    parser.add_argument("--config", required=True, metavar="CONFIG.json|NAME",
                        help="a Hugging Face config.json (or its directory), or a registry model whose "
                             "architecture config ships with flopcount (`flopcount models`)")
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--seq-len", type=positive_int, metavar="S", help="tokens per sequence (padded or packed)")
    shape.add_argument("--lengths", metavar="FILE",
                       help="a histogram of padded/packed lengths instead of --seq-len: CSV 'length,count' "
                            "or JSON {\"512\": 120, ...}; one step is planned per length, weighted by its count")
    parser.add_argument("--batch-size", type=positive_int, required=True, metavar="B",
                        help="sequences per micro-batch (per optimizer step without --grad-accum)")
    total = parser.add_mutually_exclusive_group(required=True)
    total.add_argument("--steps", type=positive_int, metavar="N", help="planned optimizer steps")
    total.add_argument("--tokens", type=positive_int, metavar="T",
                       help="planned training tokens (rounded up to whole steps)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, metavar="K",
                        help="micro-batches (forward + backward) per optimizer step (default 1)")
    parser.add_argument("--lora-rank", type=positive_int, metavar="R", help="train LoRA adapters of rank R (peft)")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", metavar="NAMES",
                        help="comma-separated Linear names that get adapters (default q_proj,v_proj)")
    parser.add_argument("--qlora", action="store_true",
                        help="LoRA on a 4-bit (NF4) base: planned as frozen Linear GEMMs (same FLOPs)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing (non-reentrant): the recompute is planned, and excluded")
    parser.add_argument("--optimizer", choices=("adamw", "sgd", "adafactor"), default="adamw",
                        help="optimizer (default adamw)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                        help="attention implementation: sdpa = fused kernel as GPUs run it (default), "
                             "eager = its matmuls and softmax")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="parameter dtype (FLOPs do not depend on it; default bfloat16)")
    add_base_model(parser)
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--tokens-per-second", type=positive_number, metavar="X", help="expected training throughput")
    pace.add_argument("--seconds-per-step", type=positive_number, metavar="X", help="expected time per step")
    parser.add_argument("--start", metavar="DATE", help="planned start (ISO date or time, UTC): dates the crossing")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--format", choices=("text", "md", "json"), default=None,
                        help="output format (default text; --json is --format json)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the output to FILE instead of stdout")


def run(args, print_json) -> int:
    from . import plan
    from .render import render

    if args.qlora and not args.lora_rank:
        raise BadInput("flopcount: --qlora trains LoRA adapters on a 4-bit base: give --lora-rank R")
    result = plan(args.config, seq_len=args.seq_len, lengths=args.lengths, batch_size=args.batch_size,
                  steps=args.steps, tokens=args.tokens, grad_accum=args.grad_accum, lora_rank=args.lora_rank,
                  lora_targets=args.lora_targets, qlora=args.qlora, gradient_checkpointing=args.gradient_checkpointing,
                  optimizer=args.optimizer, attn=args.attn, dtype=args.dtype, base_model=args.base_model,
                  base_model_flops=args.base_model_flops, systemic_risk=args.systemic_risk,
                  tokens_per_second=args.tokens_per_second, seconds_per_step=args.seconds_per_step,
                  start=args.start, approaching=args.approaching)
    fmt = "json" if args.json else (args.format or "text")
    text = render(result, fmt)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise BadInput(f"flopcount: cannot write {args.output}: {e.strerror}") from None
    elif fmt == "json":
        print_json(result)
    else:
        print(text, end="")
    return EXIT_FINDING if result["status"] == "exceeds" else EXIT_OK
