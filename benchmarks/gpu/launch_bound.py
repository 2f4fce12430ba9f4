"""A launch-bound training step on a GPU: a GPT-2-medium-sized Llama-style model (about 350M
parameters, random weights from a config) at batch 1 in bf16, where the host's work per op and
per module call is the step. Interleaved rounds of no meter, flopcount's native backend (its
defaults: modules, phases, energy, automatic steps) and torch's FlopCounterMode; JSON output.

    python benchmarks/gpu/launch_bound.py [--out FILE] [--rounds 12] [--steps 10]
    python benchmarks/gpu/launch_bound.py --device cpu --tiny --threads 1   # the CPU path, anywhere

Each round runs every variant once, in a shuffled order, under a fresh meter: one untimed step
(the meter's first: hooks and keys appear), one untimed step that books the first, then
``--steps`` timed steps (synchronised before and after each on CUDA). The overhead is the median
over rounds of (variant's median step / the same round's baseline median - 1). The native
backend's summary of one steady step must give the same training FLOPs as the dispatch backend's
(``same_totals``), so the figure is for a meter that counts what it should.

Model: 22 layers, hidden 1024, intermediate 2816, 16 heads, vocab 32000, sequence 512 (Llama-style,
sdpa attention, fused AdamW on CUDA): 0.35 B parameters. ``--tiny``: 2 layers, hidden 64, vocab
512, sequence 32, for the CPU path (float32 on CPU unless --dtype says otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared step
from reference_step import train_step  # noqa: E402

VARIANTS = ("baseline", "native", "flopcountermode")
FULL = dict(layers=22, hidden=1024, intermediate=2816, heads=16, vocab=32000, seq=512)
TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, vocab=512, seq=32)


def build(shape: dict, batch: int, device: str, dtype):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"], max_position_embeddings=shape["seq"],
        attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype=dtype)
    model.train()
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    ids = torch.randint(0, shape["vocab"], (batch, shape["seq"]), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    return model, optimizer, ids


def metering(kind: str):
    from torch.utils.flop_counter import FlopCounterMode

    import flopcount

    if kind == "baseline":
        return contextlib.nullcontext()
    if kind == "flopcountermode":
        return FlopCounterMode(display=False)
    return flopcount.meter(backend=kind, warn=False)


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a tiny model (the CPU path's test)")
    p.add_argument("--batch", type=int, default=1, choices=(1, 2))
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="default: bfloat16 on CUDA, float32 with --tiny on CPU")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", help="write the JSON here too (it is always printed)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; use --device cpu --tiny for the CPU path")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" and args.tiny else "bfloat16"))
    shape = TINY if args.tiny else FULL
    model, optimizer, ids = build(shape, args.batch, args.device, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed() -> float:
        sync()
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        sync()
        return time.perf_counter() - start

    for _ in range(3):
        train_step(model, optimizer, ids)
    times: dict[str, list[float]] = {kind: [] for kind in VARIANTS}
    order = random.Random(0)
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for kind in order.sample(VARIANTS, len(VARIANTS)):
            with metering(kind):
                train_step(model, optimizer, ids)
                train_step(model, optimizer, ids)  # books the meter's first step (once per meter)
                times[kind].append(statistics.median(timed() for _ in range(args.steps)))
    load_after = os.getloadavg()

    # The figure is for a meter that counts: native and dispatch agree on one steady step.
    totals = {}
    for backend in ("native", "dispatch"):
        with metering(backend) as m:
            train_step(model, optimizer, ids)
            train_step(model, optimizer, ids)
        totals[backend] = m.summary()["training_flops"]

    base = times["baseline"]
    rows = {}
    for kind, values in times.items():
        row = rows[kind] = {"median_ms": round(1e3 * statistics.median(values), 3),
                            "min_ms": round(1e3 * min(values), 3)}
        if kind != "baseline":
            ratios = [100 * (t / b - 1) for t, b in zip(values, base)]
            row["overhead_percent"] = round(statistics.median(ratios), 2)
            row["overhead_range_percent"] = [round(min(ratios), 2), round(max(ratios), 2)]
            row["added_ms"] = round(1e3 * (statistics.median(values) - statistics.median(base)), 3)
    out = {
        "benchmark": "launch_bound", "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "model": {**shape, "parameters": parameters, "batch": args.batch, "dtype": str(dtype).split(".")[-1]},
        "rounds": args.rounds, "timed_steps": args.steps, "threads": torch.get_num_threads(), "load_average_before": load_before,
        "load_average_after": load_after, "variants": rows,
        "training_flops_per_two_steps": totals, "same_totals": totals["native"] == totals["dispatch"],
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
