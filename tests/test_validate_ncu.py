"""Parsing and comparison of benchmarks/gpu/ncu_validate.py on the sample in benchmarks/gpu/sample/
(constructed in ncu's raw CSV layout; no GPU needed)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "benchmarks" / "gpu" / "sample"
SCRIPT = ROOT / "benchmarks" / "gpu" / "ncu_validate.py"

spec = importlib.util.spec_from_file_location("flopcount_bench_ncu", SCRIPT)
ncu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu)


def test_numbers_with_separators_units_and_na():
    assert ncu._number("137,438,953,472") == 137438953472
    assert ncu._number("1.5", "Kinst") == 1500
    assert ncu._number("2", "Mop") == 2e6
    assert ncu._number("7", "inst") == 7
    assert ncu._number("n/a") == 0 and ncu._number("") == 0


def test_raw_csv_skips_noise_and_reads_units_row():
    kernels = ncu.read_ncu_raw(SAMPLE / "gemm_bf16.csv")
    assert len(kernels) == 1
    assert kernels[0]["kernel"].startswith("sm90_xmma_gemm_bf16")
    assert kernels[0]["sm__ops_path_tensor_src_bf16_dst_fp32.sum"] == 2 * 4096 ** 3


def test_missing_header_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("==PROF== nothing profiled\n")
    with pytest.raises(ValueError, match="no ncu raw CSV header"):
        ncu.read_ncu_raw(bad)


def test_comparison_on_the_sample():
    rows = {r["workload"]: r for r in ncu.compare(SAMPLE)}
    assert set(rows) == {"gemm_bf16", "gemm_fp32", "attention_fwd"}
    bf16 = rows["gemm_bf16"]
    assert bf16["flopcount_gemm"] == 2 * 4096 ** 3
    assert bf16["ops_per_flop"] == 1.0 and bf16["tensor_vs_flopcount_gemm"] == 1.0
    fp32 = rows["gemm_fp32"]  # FFMA = 2 FLOP; no tensor work with TF32 off
    assert fp32["ncu_fp32_flop"] == 2 * 2048 ** 3 == fp32["flopcount_gemm"]
    assert fp32["tensor_vs_flopcount_gemm"] == 0.0 and fp32["tensor_plus_fma_vs_flopcount_gemm"] == 1.0
    att = rows["attention_fwd"]
    # flash computes whole 128 x 128 tiles on the causal diagonal; flopcount counts unmasked pairs only
    tiles, pairs = 16 * 17 // 2 * 128 * 128, 2048 * 2049 // 2
    assert att["flopcount_gemm"] == 2 * 32 * pairs * 256
    assert att["tensor_vs_flopcount_gemm"] == pytest.approx(tiles / pairs, abs=1e-4)


def test_calibration_divides_every_workload(tmp_path):
    for f in SAMPLE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    # a GPU whose counter reports one op per multiply-add (half the FLOPs): ratios must not move
    for name in ("gemm_bf16", "attention_fwd"):
        path = tmp_path / f"{name}.csv"
        lines = path.read_text().splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
        cells = lines[header + 2].split('","')
        cells[11] = f"{int(cells[11].replace(',', '')) // 2}"
        lines[header + 2] = '","'.join(cells)
        path.write_text("\n".join(lines) + "\n")
    rows = {r["workload"]: r for r in ncu.compare(tmp_path)}
    assert rows["gemm_bf16"]["ops_per_flop"] == 0.5
    assert rows["attention_fwd"]["tensor_vs_flopcount_gemm"] == pytest.approx(
        (16 * 17 // 2 * 128 * 128) / (2048 * 2049 // 2), abs=1e-4)


def test_compare_cli_writes_csv_and_errors_in_one_line(tmp_path):
    out = tmp_path / "cmp.csv"
    done = subprocess.run([sys.executable, str(SCRIPT), "compare", "--raw", str(SAMPLE), "--csv", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines()[0].split(",") == ncu.COMPARE_COLUMNS
    empty = subprocess.run([sys.executable, str(SCRIPT), "compare", "--raw", str(tmp_path / "none")],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert empty.stderr.strip().count("\n") == 0


def test_metric_list_keeps_only_available_ones():
    available = {"sm__ops_path_tensor_src_bf16_dst_fp32", "smsp__sass_thread_inst_executed_op_ffma_pred_on"}
    assert ncu.metric_list(available) == ["sm__ops_path_tensor_src_bf16_dst_fp32.sum",
                                          "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum"]


def test_workload_counting_runs_on_cpu():
    """The GPU script's flopcount side, on CPU: an FP32 GEMM is 2 n^3 matmul FLOP in one forward."""
    _, record = ncu.count_workload("gemm_fp32", "cpu")
    n = ncu.GEMM_SIZE["gemm_fp32"]
    assert record["by_phase_category"] == {"forward": {"matmul": 2 * n ** 3}}
    assert ncu.flopcount_totals(record) == {"flopcount_gemm": 2 * n ** 3, "flopcount_vector": 0}
