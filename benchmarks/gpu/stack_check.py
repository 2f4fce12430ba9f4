"""Fine-tuning stack check: every third-party kernel library that flopcount counts, on this machine.

For each library that is installed (bitsandbytes, flash-attn, xformers, Liger, Transformer Engine,
mamba-ssm, causal-conv1d, apex, flash-linear-attention, Unsloth, DeepSpeed) it runs one small
metered call, forward and backward, under both capture backends. It checks that there are zero
uncounted ops and no dark modules, and that the library's FLOPs equal a closed form written out
here from docs/custom_kernels.md (nothing is copied from flopcount's output). It also says which
libraries are missing, or present but unusable on this device (most need CUDA).

    python benchmarks/gpu/stack_check.py [--device cuda|cpu] [--out stack_check.json]

Prints one line per check (PASS / FAIL: counted wrong / ERROR: the call itself failed / MISSING /
SKIP, with the numbers). Writes every result as JSON (after each library, so a later hang keeps
them). Each check runs under a time limit (``--limit``). Exits 1 if any check fails or errs. On CPU, bitsandbytes (0.45+) and DeepSpeed's CPU Adam (when its
extension is built) run. The rest say why not.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu" if "--device" in sys.argv and "cpu" in sys.argv else "cuda")

import torch  # noqa: E402

import flopcount  # noqa: E402
from flopcount.formulas.constants import PER_ELEMENT  # noqa: E402

BACKENDS = ("dispatch", "native")
RESULTS: dict[str, dict] = {}
B, S, H, D = 2, 64, 4, 64  # attention: batch, sequence, heads, head size


def c(name: str) -> int:
    return PER_ELEMENT[name].flops


def report(name: str, status: str, **detail) -> None:
    RESULTS[name] = {"status": status, **detail}
    print(f"{status:7s} {name}: {json.dumps(detail, default=str)}", flush=True)


def metered(backend: str, fn) -> dict:
    with flopcount.meter(backend=backend, strict=True, warn=False) as m:
        fn()
        m.step()
    return m.summary()


def compare(name: str, backend: str, summary: dict, want: dict) -> None:
    """``want``: {(phase, category): flops} pinned by the closed form."""
    got = {f"{p}/{k}": summary["by_phase_category"].get(p, {}).get(k, 0) for p, k in want}
    expected = {f"{p}/{k}": v for (p, k), v in want.items()}
    ok = got == expected and summary["uncounted_ops"] == {} and summary["dark_modules"] == {}
    report(f"{name}[{backend}]", "PASS" if ok else "FAIL", got=got, want=expected,
           uncounted=summary["uncounted_ops"], dark=summary["dark_modules"])


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


# ---- one check per library: (module to find, device needed, function(device, backend)) -------------

def bitsandbytes_check(device: str, backend: str) -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
    x = torch.randn(8, 256, device=device, requires_grad=True)
    summary = metered(backend, lambda: layer(x).sum().backward())
    # Forward GEMM 2·T·in·out; backward: the input gradient only (the 4-bit weight is frozen).
    compare("bitsandbytes.Linear4bit", backend, summary,
            {("forward", "matmul"): 2 * 8 * 256 * 128, ("backward", "matmul"): 2 * 8 * 256 * 128})
    params = [torch.nn.Parameter(torch.randn(4096, device=device))]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=1024)
    params[0].grad = torch.randn_like(params[0])
    summary = metered(backend, opt.step)
    # Per element: the Adam update, plus dequantizing and requantizing both 8-bit states.
    compare("bitsandbytes.AdamW8bit", backend, summary,
            {("optimizer", "pointwise"): 4096 * (c("adam_step") + 2 * c("optimizer_8bit_state"))})


def flash_attn_check(device: str, backend: str) -> None:
    from flash_attn import flash_attn_func

    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    summary = metered(backend, lambda: flash_attn_func(q, k, v, causal=True).sum().backward())
    pairs = B * H * causal_pairs(S)
    compare("flash_attn.flash_attn_func", backend, summary,
            {("forward", "attention"): 4 * pairs * D, ("backward", "attention"): 8 * pairs * D,
             ("recompute", "attention"): 2 * pairs * D})


def xformers_check(device: str, backend: str) -> None:
    import xformers.ops as xops

    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = xops.LowerTriangularMask()
    summary = metered(backend, lambda: xops.memory_efficient_attention(q, k, v, attn_bias=mask).sum().backward())
    pairs = B * H * causal_pairs(S)
    compare("xformers.memory_efficient_attention", backend, summary,
            {("forward", "attention"): 4 * pairs * D, ("backward", "attention"): 8 * pairs * D,
             ("recompute", "attention"): 2 * pairs * D})


def liger_check(device: str, backend: str) -> None:
    from liger_kernel.transformers import LigerRMSNorm

    norm = LigerRMSNorm(256).to(device)
    x = torch.randn(16, 256, device=device, requires_grad=True)
    summary = metered(backend, lambda: norm(x).sum().backward())
    n = 16 * 256
    compare("liger_kernel.LigerRMSNorm", backend, summary,
            {("forward", "norm"): n * (c("rms_norm_forward") + 1),
             ("backward", "norm"): n * (c("rms_norm_backward_input") + c("norm_backward_weight"))})


def transformer_engine_check(device: str, backend: str) -> None:
    import transformer_engine.pytorch as te

    layer = te.Linear(256, 512, bias=False).to(device)
    x = torch.randn(32, 256, device=device, requires_grad=True)
    summary = metered(backend, lambda: layer(x).sum().backward())
    gemm = 2 * 32 * 256 * 512
    compare("transformer_engine.Linear", backend, summary,
            {("forward", "matmul"): gemm, ("backward", "matmul"): 2 * gemm})


def mamba_ssm_check(device: str, backend: str) -> None:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    b, d, length, n = 2, 64, 32, 16
    u = torch.randn(b, d, length, device=device, requires_grad=True)
    delta = torch.rand(b, d, length, device=device)
    a = -torch.rand(d, n, device=device)
    bb, cc = torch.randn(b, n, length, device=device), torch.randn(b, n, length, device=device)
    summary = metered(backend, lambda: selective_scan_fn(u, delta, a, bb, cc).sum().backward())
    bdl = b * d * length
    compare("mamba_ssm.selective_scan_fn", backend, summary,
            {("forward", "other"): bdl * n * c("selective_scan_step"),
             ("backward", "other"): bdl * n * c("selective_scan_backward"),
             ("recompute", "other"): bdl * n * c("selective_scan_step")})
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    heads, p, groups, state, chunk = 4, 16, 1, 16, 16
    x = torch.randn(b, length, heads, p, device=device, requires_grad=True)
    dt = torch.rand(b, length, heads, device=device)
    a_h = -torch.rand(heads, device=device)
    bg, cg = (torch.randn(b, length, groups, state, device=device) for _ in range(2))
    summary = metered(backend, lambda: mamba_chunk_scan_combined(x, dt, a_h, bg, cg, chunk).sum().backward())
    chunks = [chunk] * (length // chunk)
    products = (2 * groups * state * sum(k * k for k in chunks)
                + 2 * heads * p * (sum(causal_pairs(k) for k in chunks) + 2 * length * state))
    compare("mamba_ssm.mamba_chunk_scan_combined", backend, summary,
            {("forward", "matmul"): b * products, ("backward", "matmul"): 2 * b * products})


def causal_conv1d_check(device: str, backend: str) -> None:
    from causal_conv1d import causal_conv1d_fn

    b, d, length, width = 2, 64, 32, 4
    x = torch.randn(b, d, length, device=device, requires_grad=True)
    w = torch.randn(d, width, device=device, requires_grad=True)
    summary = metered(backend, lambda: causal_conv1d_fn(x, w).sum().backward())
    out = b * d * length
    compare("causal_conv1d.causal_conv1d_fn", backend, summary,
            {("forward", "conv"): 2 * out * width, ("backward", "conv"): 4 * out * width})


def apex_check(device: str, backend: str) -> None:
    from apex.optimizers import FusedAdam

    params = [torch.nn.Parameter(torch.randn(1000, device=device))]
    params[0].grad = torch.randn_like(params[0])
    opt = FusedAdam(params, lr=1e-3)
    compare("apex.FusedAdam", backend, metered(backend, opt.step), {("optimizer", "pointwise"): 1000 * c("adam_step")})


def fla_check(device: str, backend: str) -> None:
    from fla.ops.simple_gla import chunk_simple_gla

    t, heads, dk = 128, 4, 64
    q, k, v = (torch.randn(1, t, heads, dk, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    summary = metered(backend, lambda: chunk_simple_gla(q, k, v)[0].float().sum().backward())
    pairs = 2 * causal_pairs(64)  # two chunks of 64
    gemm = heads * (2 * pairs * 2 * dk + 2 * 2 * t * dk * dk)
    compare("fla.chunk_simple_gla", backend, summary,
            {("forward", "attention"): gemm, ("backward", "attention"): 2 * gemm})


def unsloth_check(device: str, backend: str) -> None:
    from unsloth.kernels import fast_cross_entropy_loss  # noqa: F401  (imports unsloth.kernels)
    from unsloth.kernels.rms_layernorm import Fast_RMS_Layernorm

    x = torch.randn(16, 256, device=device, requires_grad=True)
    w = torch.ones(256, device=device)
    summary = metered(backend, lambda: Fast_RMS_Layernorm.apply(x, w, 1e-6, False).sum().backward())
    n = 16 * 256
    compare("unsloth.Fast_RMS_Layernorm", backend, summary,
            {("forward", "norm"): n * (c("rms_norm_forward") + 1),
             ("backward", "norm"): n * (c("rms_norm_backward_input") + c("norm_backward_weight"))})


def deepspeed_check(device: str, backend: str) -> None:
    if device == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam as Adam
    else:
        from deepspeed.ops.adam import FusedAdam as Adam
    params = [torch.nn.Parameter(torch.randn(1000, device=device))]
    params[0].grad = torch.randn_like(params[0])
    opt = Adam(params, lr=1e-3)
    compare(f"deepspeed.{Adam.__name__}", backend, metered(backend, opt.step),
            {("optimizer", "pointwise"): 1000 * c("adam_step")})


# (name, module whose presence means installed, runs on CPU)
LIBRARIES = [
    ("bitsandbytes", "bitsandbytes", bitsandbytes_check, True),
    ("flash-attn", "flash_attn", flash_attn_check, False),
    ("xformers", "xformers", xformers_check, False),
    ("liger-kernel", "liger_kernel", liger_check, False),
    ("transformer-engine", "transformer_engine", transformer_engine_check, False),
    ("mamba-ssm", "mamba_ssm", mamba_ssm_check, False),
    ("causal-conv1d", "causal_conv1d", causal_conv1d_check, False),
    ("apex", "apex", apex_check, False),
    ("flash-linear-attention", "fla", fla_check, False),
    ("unsloth", "unsloth", unsloth_check, False),
    ("deepspeed", "deepspeed", deepspeed_check, True),
]


def deepspeed_cpu_adam_built() -> bool:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    return any(f.startswith("cpu_adam") and f.endswith(".so") for _, _, files in os.walk(root) for f in files)


class CheckTimeout(Exception):
    pass


def _timeout(signum, frame):
    raise CheckTimeout("the check ran past its time limit (a JIT extension build or its lock?)")


def write(path: str, device: str) -> dict:
    summary = {"device": device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "results": RESULTS,
               "missing": [n for n, r in RESULTS.items() if r["status"] == "MISSING"],
               "failed": [n for n, r in RESULTS.items() if r["status"] == "FAIL"],
               "errors": [n for n, r in RESULTS.items() if r["status"] == "ERROR"]}
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--out", default="stack_check.json", help="JSON file for the results")
    parser.add_argument("--limit", type=int, default=120, help="seconds per library check (default 120)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    for name, module, check, cpu_ok in LIBRARIES:
        if importlib.util.find_spec(module) is None:
            report(name, "MISSING", why=f"{module} is not installed")
            continue
        if args.device == "cpu" and not cpu_ok:
            report(name, "SKIP", why="needs CUDA")
            continue
        if name == "deepspeed" and args.device == "cpu" and not deepspeed_cpu_adam_built():
            report(name, "SKIP", why="DeepSpeed's cpu_adam extension is not built (minutes to JIT-compile)")
            continue
        for backend in BACKENDS:
            signal.signal(signal.SIGALRM, _timeout)
            signal.alarm(args.limit)
            try:
                check(args.device, backend)
            except Exception as exc:  # noqa: BLE001 - every library gets its line: ERROR, the call did not run
                report(f"{name}[{backend}]", "ERROR", error=f"{type(exc).__name__}: {exc}",
                       trace=traceback.format_exc(limit=-3))
            finally:
                signal.alarm(0)
            write(args.out, args.device)  # results so far survive a later hang
    summary = write(args.out, args.device)
    print(f"wrote {args.out}: {sum(r['status'] == 'PASS' for r in RESULTS.values())} passed, "
          f"{len(summary['failed'])} failed, {len(summary['errors'])} did not run, {len(summary['missing'])} missing")
    return 1 if summary["failed"] or summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
