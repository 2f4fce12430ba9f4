"""Hardware counters against flopcount: Nsight Compute on an H100/H200, one device call (<= 6 minutes).

    python benchmarks/gpu/ncu_validate.py run --out DIR          # on the GPU machine (needs ncu, CUDA torch)
    python benchmarks/gpu/ncu_validate.py compare --raw DIR [--csv PATH]   # parse + compare (CPU is fine)

`run` profiles each workload in its own process under `ncu`, restricted to the NVTX range named after
the workload (warm-up and flopcount's own counting run stay outside it), then calls `compare`.
Per workload it leaves in DIR: `<name>.csv` (ncu --csv --page raw --print-units base) and
`<name>.flopcount.json` (flopcount's by_phase_category for the same work, counted in the warm-up).

Workloads: tile-aligned GEMMs (BF16, FP16 on tensor cores; FP32 with TF32 off on the FMA pipes),
fused causal attention forward and forward + backward (SDPA flash, BF16), one Llama-style training
step (BF16, fused AdamW).

Counters: `sm__ops_path_tensor_src_*` (math ops on the tensor path, per source type) and
`smsp__sass_thread_inst_executed_op_{f,h}{fma,add,mul}_pred_on.sum` (FMA = 2 FLOP). The tensor
"ops" unit is calibrated on the BF16 GEMM, whose FLOPs are known exactly (2 m n k): the script
reports ops per FLOP and divides by it everywhere, so no assumption about the unit is baked in.
Comparison: tensor FLOP vs flopcount's GEMM categories (matmul + attention + conv, every phase:
the hardware also executes recompute), FP32/FP16 FLOP vs flopcount's vector categories.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

TENSOR_METRICS = [f"sm__ops_path_tensor_src_{src}.sum" for src in
                  ("bf16_dst_fp32", "fp16_dst_fp32", "fp16_dst_fp16", "tf32_dst_fp32", "fp8")]
SCALAR_METRICS = {  # metric -> FLOP per instruction per thread
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum": 2,
    "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum": 1,
    "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum": 1,
    "smsp__sass_thread_inst_executed_op_hfma_pred_on.sum": 2,
    "smsp__sass_thread_inst_executed_op_hadd_pred_on.sum": 1,
    "smsp__sass_thread_inst_executed_op_hmul_pred_on.sum": 1,
}
EXTRA_METRICS = ["sm__inst_executed_pipe_tensor.sum"]
GEMM_CATEGORIES = ("matmul", "attention", "conv")
VECTOR_CATEGORIES = ("pointwise", "norm", "reduction", "other")
CALIBRATION_WORKLOAD = "gemm_bf16"
SI = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}

WORKLOADS = ("gemm_bf16", "gemm_fp16", "gemm_fp32", "attention_fwd", "attention_fwd_bwd", "llama_step")
GEMM_SIZE = {"gemm_bf16": 4096, "gemm_fp16": 4096, "gemm_fp32": 2048}
ATTENTION = dict(batch=2, heads=16, seq=2048, head_dim=128)


# ---- parsing (pure; tested on CPU with the sample in benchmarks/gpu/sample/) ----------------------
def _number(text: str, unit: str = "") -> float:
    """A value from ncu's CSV ('1,234', '5.5', 'n/a'), scaled by an SI prefix of its unit ('Kinst')."""
    text = text.strip().replace(",", "")
    if not text or "n/a" in text.lower():
        return 0.0
    unit = unit.strip()
    scale = SI[unit[0]] if len(unit) > 1 and unit[0] in SI and unit[1:2].islower() else 1
    return float(text) * scale


def read_ncu_raw(path: Path) -> list[dict]:
    """Rows of `ncu --csv --page raw`: a header line, a units line, one line per profiled kernel.
    Lines before the header (==PROF== messages, program output) are skipped."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError(f"{path}: no ncu raw CSV header (a line starting with \"ID\"); "
                         f"export with `ncu --import REP --csv --page raw --print-units base`")
    reader = list(csv.reader(lines[start:]))
    header, units, body = reader[0], reader[1], reader[2:]
    has_units = not (units and units[0].strip().isdigit())
    if not has_units:
        body, units = reader[1:], [""] * len(header)
    kernels = []
    for values in body:
        if len(values) != len(header):
            continue
        row = {"kernel": values[header.index("Kernel Name")] if "Kernel Name" in header else ""}
        for name, unit, value in zip(header, units, values):
            if "__" in name:  # metric columns (sm__..., smsp__...)
                row[name] = _number(value, unit)
        kernels.append(row)
    return kernels


def hardware_totals(kernels: list[dict]) -> dict:
    tensor_ops = sum(k.get(m, 0.0) for k in kernels for m in TENSOR_METRICS)
    fp32 = sum(k.get(m, 0.0) * w for k in kernels for m, w in SCALAR_METRICS.items() if "_op_f" in m)
    fp16 = sum(k.get(m, 0.0) * w for k in kernels for m, w in SCALAR_METRICS.items() if "_op_h" in m)
    return {"kernels": len(kernels), "tensor_ops": tensor_ops, "fp32_flop": fp32, "fp16_flop": fp16,
            "tensor_inst": sum(k.get("sm__inst_executed_pipe_tensor.sum", 0.0) for k in kernels)}


def flopcount_totals(summary: dict) -> dict:
    """GEMM and vector FLOPs over every phase (recompute included: the hardware runs it)."""
    gemm = vector = 0
    for categories in summary["by_phase_category"].values():
        gemm += sum(categories.get(c, 0) for c in GEMM_CATEGORIES)
        vector += sum(categories.get(c, 0) for c in VECTOR_CATEGORIES)
    return {"flopcount_gemm": gemm, "flopcount_vector": vector}


COMPARE_COLUMNS = ["workload", "kernels", "flopcount_gemm", "flopcount_vector", "ncu_tensor_ops",
                   "ops_per_flop", "ncu_tensor_flop", "ncu_fp32_flop", "ncu_fp16_flop",
                   "tensor_vs_flopcount_gemm", "tensor_plus_fma_vs_flopcount_gemm", "scalar_vs_flopcount_vector"]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def compare(raw_dir: Path) -> list[dict]:
    """One row per workload found in raw_dir (<name>.csv + <name>.flopcount.json)."""
    measured = {}
    for csv_path in sorted(raw_dir.glob("*.csv")):
        json_path = csv_path.with_suffix(".flopcount.json")
        if csv_path.name.endswith(".compare.csv") or not json_path.exists():
            continue
        counted = flopcount_totals(json.loads(json_path.read_text()))
        measured[csv_path.stem] = (hardware_totals(read_ncu_raw(csv_path)), counted)
    if not measured:
        raise ValueError(f"{raw_dir}: no <workload>.csv with a matching <workload>.flopcount.json")
    ops_per_flop = 1.0
    if CALIBRATION_WORKLOAD in measured:
        hw, counted = measured[CALIBRATION_WORKLOAD]
        if hw["tensor_ops"] and counted["flopcount_gemm"]:
            ops_per_flop = hw["tensor_ops"] / counted["flopcount_gemm"]
    rows = []
    for name, (hw, counted) in measured.items():
        tensor_flop = hw["tensor_ops"] / ops_per_flop
        scalar = hw["fp32_flop"] + hw["fp16_flop"]
        rows.append({
            "workload": name, "kernels": hw["kernels"], **counted, "ncu_tensor_ops": round(hw["tensor_ops"]),
            "ops_per_flop": round(ops_per_flop, 4), "ncu_tensor_flop": round(tensor_flop),
            "ncu_fp32_flop": round(hw["fp32_flop"]), "ncu_fp16_flop": round(hw["fp16_flop"]),
            "tensor_vs_flopcount_gemm": _ratio(tensor_flop, counted["flopcount_gemm"]),
            "tensor_plus_fma_vs_flopcount_gemm": _ratio(tensor_flop + scalar, counted["flopcount_gemm"]),
            "scalar_vs_flopcount_vector": _ratio(scalar, counted["flopcount_vector"]),
        })
    return rows


def write_compare(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COMPARE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# ---- the profiled process -----------------------------------------------------------------------
def _workload(name: str, dev: str = "cuda"):
    """(callable that runs the work once, description)."""
    import torch
    import torch.nn.functional as F

    if name in GEMM_SIZE:
        n = GEMM_SIZE[name]
        dtype = {"gemm_bf16": torch.bfloat16, "gemm_fp16": torch.float16, "gemm_fp32": torch.float32}[name]
        torch.backends.cuda.matmul.allow_tf32 = False  # FP32 on the FMA pipes, not TF32 tensor cores
        a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
        return (lambda: torch.mm(a, b)), f"mm {n}x{n}x{n} {dtype}"
    if name.startswith("attention"):
        shape = (ATTENTION["batch"], ATTENTION["heads"], ATTENTION["seq"], ATTENTION["head_dim"])
        backward = name.endswith("bwd")
        q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=backward) for _ in range(3))

        def run():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if backward:
                    out.backward(torch.ones_like(out))
        return run, f"SDPA flash causal {shape} bf16" + (" fwd+bwd" if backward else " fwd")
    if name == "llama_step":
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                                          attn_implementation="sdpa", tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).to(dev, torch.bfloat16).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(0, 32000, (2, 1024), device=dev)

        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run, "Llama 2 layers, hidden 1024, seq 1024, batch 2, bf16, fused AdamW"
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def count_workload(name: str, dev: str = "cuda"):
    """Run the workload twice (warm-up, then under flopcount); return (run, flopcount record)."""
    sys.path.insert(0, str(REPO))
    import torch

    import flopcount

    run, what = _workload(name, dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    run()  # warm-up: cuBLAS/cuDNN handles, autotuning, optimizer state
    sync()
    with flopcount.meter(backend="dispatch", warn=False) as meter:
        run()
        sync()
        meter.step()
    summary = meter.summary()
    device = torch.cuda.get_device_name() if dev == "cuda" else dev
    return run, {"workload": name, "what": what, "device": device,
                 "by_phase_category": summary["by_phase_category"], "uncounted_ops": summary["uncounted_ops"]}


def profiled_process(name: str, out_dir: Path) -> None:
    import torch

    run, record = count_workload(name)
    (out_dir / f"{name}.flopcount.json").write_text(json.dumps(record, indent=1))
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(name)
    run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


# ---- the driver -------------------------------------------------------------------------------
def available_metrics(ncu: str) -> set[str]:
    listing = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip() and "__" in line.split()[0]}


def metric_list(available: set[str]) -> list[str]:
    wanted = TENSOR_METRICS + list(SCALAR_METRICS) + EXTRA_METRICS
    return [m for m in wanted if m.rsplit(".", 1)[0] in available]


def drive(out_dir: Path, workloads: list[str], budget_s: float) -> int:
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = metric_list(available_metrics(ncu))
    (out_dir / "metrics.txt").write_text("\n".join(metrics) + "\n")
    deadline = time.monotonic() + budget_s
    for name in workloads:
        left = deadline - time.monotonic()
        if left < 20:
            print(f"ncu_validate: out of time before {name}", file=sys.stderr)
            break
        report = out_dir / f"{name}"
        cmd = [ncu, "--nvtx", "--nvtx-include", f"{name}/", "--metrics", ",".join(metrics),
               "--launch-count", "2000", "-f", "-o", str(report),
               sys.executable, __file__, "workload", name, "--out", str(out_dir)]
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            print(f"ncu_validate: {name} timed out", file=sys.stderr)
            break
        (out_dir / f"{name}.ncu.log").write_text(done.stdout + done.stderr)
        exported = subprocess.run([ncu, "--import", f"{report}.ncu-rep", "--csv", "--page", "raw",
                                   "--print-units", "base"], capture_output=True, text=True)
        (out_dir / f"{name}.csv").write_text(exported.stdout)
        print(f"{name}: rc={done.returncode} {time.monotonic() - start:.0f} s", flush=True)
    rows = compare(out_dir)
    write_compare(rows, out_dir / "ncu_validation.compare.csv")
    for row in rows:
        print(row)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Nsight Compute counters against flopcount")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="profile every workload under ncu, then compare")
    p_run.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "ncu_out")))
    p_run.add_argument("--workloads", default=",".join(WORKLOADS))
    p_run.add_argument("--budget-s", type=float, default=330.0, help="stop starting workloads after this")
    p_work = sub.add_parser("workload", help="(internal) the profiled process")
    p_work.add_argument("name", choices=WORKLOADS)
    p_work.add_argument("--out", type=Path, required=True)
    p_cmp = sub.add_parser("compare", help="parse raw CSVs + flopcount JSONs, write the comparison CSV")
    p_cmp.add_argument("--raw", type=Path, required=True)
    p_cmp.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "run":
        return drive(args.out, args.workloads.split(","), args.budget_s)
    if args.command == "workload":
        profiled_process(args.name, args.out)
        return 0
    try:
        rows = compare(args.raw)
    except ValueError as exc:
        print(f"ncu_validate.py: {exc}", file=sys.stderr)
        return 2
    write_compare(rows, args.csv or args.raw / "ncu_validation.compare.csv")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
