"""Throughput view: achieved FLOP/s, MFU against a device's peak, and the guidelines' hardware estimate.

Two ways to estimate training compute, side by side:
  counted   -- flopcount's operator count (what ran), divided by the measured time: achieved FLOP/s;
  hardware  -- devices x time x peak FLOP/s x utilisation (the hardware-based method of the Commission
               guidelines on GPAI models, C(2025) 7719, Annex A). Its weak point is the utilisation,
               which the provider must assume; flopcount's MFU is the measured value of it.

Peak table: flopcount.hardware.PEAKS_TFLOPS (dense, no 2:4 sparsity, TFLOP/s per device and dtype, with
sources); datasheets quote sparse tensor-core figures, the dense value is that figure / 2.
"""
from __future__ import annotations

import time

# The one peak table and the hardware-method arithmetic live in the package (flopcount/hardware.py);
# re-exported here under the names the validation scripts use.
from flopcount.hardware import (ASSUMED_UTILISATION, PEAKS_TFLOPS, Peak, achieved_flops_per_s,  # noqa: F401
                                hardware_estimate, mfu, peak_flops_per_s)


def measured_cpu_matmul_peak(size: int = 2048, repeats: int = 3) -> float:
    """Best FP32 FLOP/s of a square torch.mm on this CPU: a practical peak (no datasheet exists
    for a virtual CPU), used as the denominator of MFU in the CPU runs."""
    import torch

    a = torch.randn(size, size)
    a @ a  # warm-up: thread pool and packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
