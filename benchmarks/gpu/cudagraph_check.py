"""GPU check for issue 6: CUDA graphs, torch.compile (Inductor/Triton, reduce-overhead) and Triton.

Run on a CUDA machine:  python benchmarks/gpu/cudagraph_check.py [--out results.json]
Prints one line per check (PASS/FAIL with the numbers) and exits non-zero if any check fails.
Every expectation is a closed form (see docs/conventions.md); nothing is copied from flopcount.
About 1-3 minutes on an H100, most of it compiling.
On torch 2.11 (H200, 2026-11-27) the reduce-overhead loop fails also without a meter
(reduce_overhead_probe.py shows it); the other checks pass under both backends.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

import flopcount
from flopcount.formulas.registry import op_name

RESULTS: dict[str, dict] = {}
D, HEADS, B, T = 256, 4, 4, 128
BACKENDS = ("dispatch", "native")


def check(name: str, got, want) -> None:
    RESULTS[name] = {"ok": got == want, "got": got, "want": want}
    print(f"{'PASS' if got == want else 'FAIL'} {name}: got {got} want {want}", flush=True)


def gemm(summary: dict) -> dict:
    return {f"{p}/{c}": f for p, cats in summary["by_phase_category"].items() for c, f in cats.items()
            if c in ("matmul", "attention", "conv") and f}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.o = nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(x)))


def block_forward_gemm(b: int, t: int) -> dict:
    n, dh = b * t, D // HEADS
    pairs = b * HEADS * t * (t + 1) // 2
    return {"matmul": 2 * n * (3 * D * D + D * D + 8 * D * D), "attention": 2 * pairs * 2 * dh}


def _sum_keys(flops: dict) -> dict:
    out: dict = {}
    for (phase, category, _, _), f in flops.items():
        out[(phase, category, None, None)] = out.get((phase, category, None, None), 0) + f
    return out


def eager_cuda_graph(backend: str) -> None:
    lin = nn.Linear(512, 1024, bias=False).cuda()
    x = torch.randn(64, 512, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            lin(x)  # warm-up, outside the meter
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with flopcount.meter(backend=backend, warn=False) as m:
        with torch.no_grad(), torch.cuda.graph(graph):
            lin(x)
        captured = m.step()
        for _ in range(5):
            graph.replay()
        replayed = m.step()
    torch.cuda.synchronize()
    check(f"cuda_graph_capture_books_nothing[{backend}]", sum(captured.flops.values()), 0)
    check(f"cuda_graph_replays[{backend}]", replayed.category_totals().get("matmul", 0), 5 * 2 * 64 * 512 * 1024)


def compiled(mode: str | None, backend: str) -> None:
    torch.manual_seed(0)
    model = Block().cuda()
    cmodel = torch.compile(model, mode=mode, fullgraph=True)
    x = torch.randn(B, T, D, device="cuda")
    fwd = block_forward_gemm(B, T)
    want = {"forward/matmul": fwd["matmul"], "backward/matmul": 2 * fwd["matmul"],
            "forward/attention": fwd["attention"], "backward/attention": 2 * fwd["attention"],
            "recompute/attention": fwd["attention"] // 2}
    per_step = []
    with flopcount.meter(backend=backend, warn=False) as m:
        for _ in range(4):  # cudagraph trees: warm-up, record, then replays; each call counts once
            cmodel(x).sum().backward()
            record = m.step()
            per_step.append({f"{p}/{c}": f for (p, c, _, _), f in _sum_keys(record.flops).items()
                             if c in ("matmul", "attention", "conv") and f})
    check(f"compiled[{mode}][{backend}]_gemm_each_call", per_step, [want] * 4)
    check(f"compiled[{mode}][{backend}]_uncounted", m.summary()["uncounted_ops"], {})
    with flopcount.meter(backend=backend, warn=False) as m:
        model(x).sum().backward()
    check(f"eager_gemm_vs_closed_form[{mode}][{backend}]", gemm(m.summary()), want)


try:  # module level: flopcount finds kernels without a formula as module attributes
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, 3.0 * tl.load(x_ptr + offs, mask=mask), mask=mask)

    @triton.jit
    def plain_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)
except ImportError:
    triton = None


def triton_eager() -> None:
    flopcount.register_formula(scale_kernel, lambda x, y, n, *, BLOCK=None, out_shape=None: n,
                               category="pointwise")
    x = torch.randn(10_000, device="cuda")
    y = torch.empty_like(x)
    grid = (triton.cdiv(x.numel(), 1024),)
    with flopcount.meter(backend="dispatch", warn=False) as m:
        for _ in range(3):
            scale_kernel[grid](x, y, x.numel(), BLOCK=1024)
        plain_kernel[grid](x, y, x.numel(), BLOCK=1024)
    torch.cuda.synchronize()
    s = m.summary()
    check("triton_gpu_counted", s["by_category"]["pointwise"], 3 * 10_000)
    check("triton_gpu_uncounted", list(s["uncounted_ops"].values()), [1])

    def scaled(v):  # a user kernel inside a compiled region: counted from the region's graph
        out = torch.empty_like(v)
        scale_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), BLOCK=1024)
        return out + 1.0

    cscaled = torch.compile(scaled, fullgraph=True)
    cscaled(x)
    with flopcount.meter(backend="dispatch", warn=False) as m:
        for _ in range(2):
            cscaled(x)
    s = m.summary()
    name = op_name(scale_kernel)
    check("triton_in_compiled_region", s["by_op"].get(name, {}).get("flops"), 2 * 10_000)
    check("triton_in_compiled_region_uncounted", s["uncounted_ops"], {})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    checks = [(f"eager_cuda_graph[{b}]", functools.partial(eager_cuda_graph, b)) for b in BACKENDS]
    checks += [(f"compiled[{mode}][{b}]", functools.partial(compiled, mode, b))
               for mode in (None, "reduce-overhead") for b in BACKENDS]
    checks.append(("triton_eager", triton_eager))
    for name, fn in checks:
        try:
            fn()
        except Exception as exc:  # report and go on: one failing check must not hide the others
            RESULTS[f"{name}_error"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)[-6:]]
            print(f"FAIL {name}: {type(exc).__name__}: {exc}\n  at {' < '.join(reversed(where))}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    failed = [k for k, v in RESULTS.items() if not v["ok"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
