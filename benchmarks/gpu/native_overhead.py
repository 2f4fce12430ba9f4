"""Native backend on a GPU: step overhead on a ~1B-parameter Llama bf16 training step, and no
added host-device synchronisation. One device call (about 4-6 minutes on an H100, build included):

    python benchmarks/gpu/native_overhead.py [--out DIR] [--quick]

1. Builds the extension against the machine's CUDA torch (FLOPCOUNT_NATIVE_CACHE, default $OUT or
   /tmp) and fails loudly if it does not load.
2. Sync check: one training step under torch.cuda.set_sync_debug_mode, without a meter and with
   the native meter (step() included); the meter must add no synchronising call. Also a varlen
   flash-attention call (cu_seqlens on the device) under mode "error": its offsets reach the
   formula through an asynchronous copy, and its FLOPs must equal the closed form.
3. Overhead: median step time (CUDA events, synchronised outside the timed region) of baseline,
   torch FlopCounterMode, dispatch and native, interleaved in one run. Goal: native <= 1 %.
Writes DIR/native_overhead.json and prints a Markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared step
from reference_step import metering, train_step  # noqa: E402


def llama_1b():
    import torch
    import transformers

    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, intermediate 5632, 32 heads (4 KV), vocab 32000.
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        attn_implementation="sdpa", tie_word_embeddings=False, torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    return model, optimizer


def sync_calls(fn) -> int:
    """Synchronising CUDA calls that ``fn`` makes (torch's sync debug mode, 'warn')."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def check_sync(model, optimizer, ids) -> dict:
    import flopcount
    import torch

    torch.cuda.synchronize()
    baseline = sync_calls(lambda: train_step(model, optimizer, ids))
    with flopcount.meter(backend="native", warn=False) as m:
        train_step(model, optimizer, ids)  # first step: op descriptions, registry push
        m.step()
        torch.cuda.synchronize()

        def metered_step():
            train_step(model, optimizer, ids)
            m.step(tokens=ids.numel())

        native = sync_calls(metered_step)
    return {"sync_calls_baseline": baseline, "sync_calls_native": native,
            "meter_adds_sync": native > baseline}


def check_varlen() -> dict:
    """Packed sequences through flash attention with cu_seqlens on the device, under mode 'error'."""
    import flopcount
    import torch

    lengths = [300, 700, 24]
    heads, dim = 8, 64
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 300, 1000, 1024], device="cuda", dtype=torch.int32)
    op = torch.ops.aten._flash_attention_forward
    with flopcount.meter(backend="native", warn=False) as m:
        torch.cuda.set_sync_debug_mode("error")
        try:
            op(q, k, v, cu, cu, max(lengths), max(lengths), 0.0, True, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    pairs = sum(n * (n + 1) // 2 for n in lengths) * heads
    expected = 2 * pairs * (dim + dim)
    counted = m.summary()["by_category"].get("attention", 0)
    return {"varlen_attention_flops": counted, "varlen_expected": expected, "varlen_ok": counted == expected}


def measure(model, optimizer, ids, rounds: int) -> dict:
    import torch

    kinds = ["baseline", "flopcountermode", "dispatch", "native"]
    samples = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind in kinds:
            with metering(kind):
                train_step(model, optimizer, ids)  # warm-up and first-step set-up outside the timing
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                wall = time.perf_counter()
                start.record()
                train_step(model, optimizer, ids)
                end.record()
                torch.cuda.synchronize()
                wall = time.perf_counter() - wall
            samples[kind].append(max(start.elapsed_time(end) / 1e3, wall))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter sequences")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLOPCOUNT_NATIVE_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "flopcount-native"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

    import torch
    from flopcount.capture import native

    start = time.time()
    facts = native.describe()
    print(f"build: {facts['native_extension']} in {time.time() - start:.0f} s ({facts['native_error']})", flush=True)
    if native.load() is None:
        return 1
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "batch": args.batch, "seq": args.seq // (2 if args.quick else 1)}
    result.update(check_varlen())
    print(json.dumps(result), flush=True)
    model, optimizer = llama_1b()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32000, (args.batch, result["seq"]), device="cuda")
    train_step(model, optimizer, ids)
    result.update(check_sync(model, optimizer, ids))
    print(json.dumps(result), flush=True)
    steps = measure(model, optimizer, ids, rounds=3 if args.quick else 6)
    base = steps["baseline"]
    result["step_median_s"] = steps
    result["overhead"] = {k: steps[k] / base - 1 for k in steps if k != "baseline"}
    (out / "native_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}, torch {result['torch']}, Llama {result['parameters'] / 1e9:.2f}B bf16, "
          f"batch {args.batch} x {result['seq']}, fused AdamW; sync calls baseline "
          f"{result['sync_calls_baseline']}, native {result['sync_calls_native']}; varlen ok: {result['varlen_ok']}")
    print("| capture | step median (ms) | overhead |\n|---|---:|---:|")
    print(f"| baseline | {base * 1e3:.1f} | |")
    for kind, value in result["overhead"].items():
        print(f"| {kind} | {steps[kind] * 1e3:.1f} | {value * 100:+.2f} % |")
    return 0 if result["varlen_ok"] and not result["meter_adds_sync"] else 1


if __name__ == "__main__":
    sys.exit(main())
