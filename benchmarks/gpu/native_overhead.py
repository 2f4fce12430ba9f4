"""Native backend on a GPU: step overhead on a ~1B-parameter Llama bf16 training step, and no
added host-device synchronisation. One device call (81 s on an H200, 34 s of it the build):

    python benchmarks/gpu/native_overhead.py [--out DIR] [--quick]

1. Builds the extension against the machine's CUDA torch (FLOPCOUNT_NATIVE_CACHE, default $OUT or
   /tmp) and fails loudly if it does not load.
2. Sync check: one training step under torch.cuda.set_sync_debug_mode, without a meter and with
   the native meter (step() included); the meter must add no synchronising call. Also a varlen
   flash-attention call (cu_seqlens on the device) under mode "error": its offsets reach the
   formula through an asynchronous copy, and its FLOPs must equal the closed form. Where the bare
   step makes no synchronising call, the metered step also runs under mode "error".
3. Overhead: step times (CUDA events and wall clock, the larger; m.step() inside the timed region)
   of baseline, torch FlopCounterMode, dispatch and native, interleaved in shuffled rounds; the
   overhead is the median over rounds of each round's ratio to its baseline. Goal: native <= 1 %.
   The dispatch and native summaries of one steady step must be identical.
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

    # TinyLlama-1.1B's shape (22 layers, hidden 2048, intermediate 5632, 32 heads, vocab 32000) with
    # full multi-head attention (1.26B parameters): torch 2.11's FlopCounterMode, the baseline,
    # raises on grouped-query sdpa ("query/key/value shapes are incompatible").
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: seconds, not a minute of CPU init
        model = transformers.LlamaForCausalLM(config).to(dtype=torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    return model, optimizer


def sync_calls(fn) -> int:
    """Synchronising CUDA calls that ``fn`` makes (torch's sync debug mode 'warn'; warnings raised
    in autograd's device threads are replayed in the calling thread)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def raises_on_sync(fn) -> str | None:
    """None when ``fn`` runs under sync debug mode 'error', else the error's first line."""
    import torch

    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_sync(model, optimizer, ids) -> dict:
    """The meter adds no synchronising call to a training step, m.step() included. Counted in
    mode 'warn' against the same step without a meter; where the bare step has none, the metered
    step also runs under mode 'error' (the issue's check)."""
    import flopcount
    import torch

    torch.cuda.synchronize()
    baseline = sync_calls(lambda: train_step(model, optimizer, ids))
    result = {"sync_calls_baseline": baseline}
    with flopcount.meter(backend="native", warn=False) as m:
        train_step(model, optimizer, ids)  # first step: op descriptions, registry push
        m.step()
        torch.cuda.synchronize()

        def metered_step():
            train_step(model, optimizer, ids)
            m.step(tokens=ids.numel())

        result["sync_calls_native"] = sync_calls(metered_step)
        if baseline == 0:
            result["native_error_mode"] = raises_on_sync(metered_step) or "no synchronising call"
    result["meter_adds_sync"] = (result["sync_calls_native"] > baseline
                                 or result.get("native_error_mode", "no synchronising call") != "no synchronising call")
    return result


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


def measure(model, optimizer, ids, rounds: int, steps: int) -> tuple[dict, dict, dict]:
    """Step times (s) per capture, interleaved: each round enters every capture once (in a new
    order each round), runs one untimed step (first-step set-up) and then ``steps`` timed steps.
    Returns (samples, each flopcount backend's summary of its first meter, captures that failed)."""
    import random

    kinds = ["baseline", "flopcountermode", "dispatch", "native"]
    samples: dict[str, list[list[float]]] = {k: [] for k in kinds}
    summaries: dict[str, dict] = {}
    failed: dict[str, str] = {}
    order = list(kinds)
    shuffle = random.Random(0)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for kind in (k for k in order if k not in failed):
            try:
                samples[kind].append(step_times(kind, model, optimizer, ids, steps, summaries))
            except Exception as exc:  # report and go on: one failing capture must not hide the rest
                failed[kind] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                print(f"{kind} failed: {failed[kind]}", flush=True)
    return {k: v for k, v in samples.items() if v}, summaries, failed


def step_times(kind, model, optimizer, ids, steps, summaries) -> list[float]:
    """``steps`` step times under one capture, each synchronised before and after and timed by
    CUDA events and the wall clock (the larger); m.step() is inside the timed region."""
    import torch

    metered = kind in ("dispatch", "native")
    times = []
    with metering(kind) as m:
        train_step(model, optimizer, ids)
        if metered:
            m.step()
        torch.cuda.synchronize()
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            start.record()
            train_step(model, optimizer, ids)
            if metered:
                m.step(tokens=ids.numel())
            end.record()
            torch.cuda.synchronize()
            times.append(max(start.elapsed_time(end) / 1e3, time.perf_counter() - wall))
        if metered and kind not in summaries:
            summaries[kind] = m.summary()
    return times


def paired(samples: dict, kind: str) -> dict:
    """Median of the per-round ratios of ``kind``'s median step to the same round's baseline."""
    ratios = [statistics.median(t) / statistics.median(b) - 1
              for t, b in zip(samples[kind], samples["baseline"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter sequences")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per capture and round")
    args = parser.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLOPCOUNT_NATIVE_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "flopcount-native"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

    import torch
    from flopcount.capture import native

    start = time.time()
    native.build()  # in the foreground: a benchmark waits for the build
    facts = native.describe()
    print(f"build: {facts['native_extension']} in {time.time() - start:.0f} s ({facts['native_error']})", flush=True)
    if native.load() is None:
        return 1
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "batch": args.batch, "seq": args.seq // (2 if args.quick else 1)}
    result.update(check_varlen())
    print(f"[{time.time() - start:.0f} s]", json.dumps(result), flush=True)
    model, optimizer = llama_1b()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32000, (args.batch, result["seq"]), device="cuda")
    train_step(model, optimizer, ids)
    result.update(check_sync(model, optimizer, ids))
    print(f"[{time.time() - start:.0f} s]", json.dumps(result), flush=True)
    samples, summaries, result["failed"] = measure(model, optimizer, ids, rounds=args.rounds, steps=args.steps)
    flat = {k: [t for r in v for t in r] for k, v in samples.items()}
    base = statistics.median(flat["baseline"])
    result["step_median_s"] = {k: statistics.median(v) for k, v in flat.items()}
    result["step_samples_s"] = samples
    result["overhead"] = {k: paired(samples, k) for k in samples if k != "baseline"}
    # by_op differs by design in one name: under a TorchDispatchMode autograd accumulates
    # gradients out of place (aten.add), natively in place (aten.add_); README, "Backends".
    keys = ("training_flops", "by_phase_category", "by_module", "uncounted_ops", "steps", "tokens")
    result["backends_identical"] = len(summaries) == 2 and all(
        summaries["dispatch"].get(k) == summaries["native"].get(k) for k in keys)
    result["step_training_flops"] = summaries.get("native", {}).get("training_flops")
    (out / "native_overhead.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\n[{time.time() - start:.0f} s] {result['device']}, torch {result['torch']}, "
          f"Llama {result['parameters'] / 1e9:.2f}B bf16, batch {args.batch} x {result['seq']}, fused AdamW, "
          f"{args.rounds} rounds x {args.steps} steps; sync calls baseline {result['sync_calls_baseline']}, "
          f"native {result['sync_calls_native']} ({result.get('native_error_mode', 'error mode not run')}); "
          f"varlen ok: {result['varlen_ok']}; dispatch and native summaries identical: {result['backends_identical']}")
    print("| capture | step median (ms) | overhead, median of paired rounds [min, max] |\n|---|---:|---:|")
    print(f"| baseline | {base * 1e3:.1f} | |")
    for kind, value in result["overhead"].items():
        print(f"| {kind} | {result['step_median_s'][kind] * 1e3:.1f} | {value['median'] * 100:+.2f} % "
              f"[{value['min'] * 100:+.2f}, {value['max'] * 100:+.2f}] |")
    ok = result["varlen_ok"] and not result["meter_adds_sync"] and result["backends_identical"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
