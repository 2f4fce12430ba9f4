"""Device peak FLOP/s and the guidelines' hardware-based estimate (C(2025) 7719, Annex A.2.1).

The hardware-based method estimates training compute as
``devices x training time x peak FLOP/s x utilisation``. Its weak point is the utilisation,
which a provider has to assume; flopcount counts the FLOPs, so it shows the estimate beside
the count and the utilisation the count implies (model FLOPs utilisation, MFU).

``PEAKS_TFLOPS`` is the one peak table of the project: dense throughput (no 2:4 structured
sparsity) in TFLOP/s per device and dtype. Datasheets quote tensor-core figures with sparsity;
where they do, the dense value is that figure / 2 (each row's source says so). ``fp32`` is the
non-tensor (CUDA-core / vector) rate; ``tf32`` the TF32 tensor-core rate; ``fp16`` equals ``bf16``
on every device listed. ``None``: the device has no such tensor cores (A100: no FP8).
"""
from __future__ import annotations

import re
from typing import NamedTuple

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
DEFAULT_DTYPE = "bf16"
# The hardware method needs a utilisation; 0.4 is a common planning value. It is flopcount's
# assumption, not a number from the guidelines; the measured MFU is shown beside it.
ASSUMED_UTILISATION = 0.4
HARDWARE_METHOD = ("hardware-based estimate (guidelines C(2025) 7719, Annex A.2.1): devices x training time x "
                   "peak FLOP/s x utilisation")


class Peak(NamedTuple):
    fp32: float           # dense FP32, non-tensor (CUDA cores / vector units), TFLOP/s
    tf32: float | None    # dense TF32 tensor cores
    bf16: float           # dense BF16 tensor cores
    fp16: float           # dense FP16 tensor cores
    fp8: float | None     # dense FP8 tensor cores (None: no FP8 tensor cores)
    source: str


PEAKS_TFLOPS: dict[str, Peak] = {
    "H100-SXM": Peak(66.9, 494.7, 989.4, 989.4, 1978.9,
                     "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67; TF32 989, BF16/FP16 1,979, "
                     "FP8 3,958 TFLOPS with sparsity (dense = half); nvidia.com/en-us/data-center/h100"),
    "H100-PCIe": Peak(51.2, 378.0, 756.5, 756.5, 1513.0,
                      "NVIDIA H100 datasheet, H100 PCIe: FP32 51; TF32 756, BF16/FP16 1,513, FP8 3,026 TFLOPS "
                      "with sparsity (dense = half)"),
    "H100-NVL": Peak(60.0, 417.5, 835.5, 835.5, 1670.5,
                     "NVIDIA H100 datasheet, H100 NVL (per GPU): FP32 60; TF32 835, BF16/FP16 1,671, FP8 3,341 "
                     "TFLOPS with sparsity (dense = half)"),
    "H200-SXM": Peak(66.9, 494.7, 989.4, 989.4, 1978.9,
                     "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: FP32 67; TF32 989, BF16/FP16 1,979, "
                     "FP8 3,958 TFLOPS with sparsity (dense = half); nvidia.com/en-us/data-center/h200"),
    "H200-NVL": Peak(60.0, 417.5, 835.5, 835.5, 1670.5,
                     "NVIDIA H200 datasheet, H200 NVL: FP32 60; TF32 835, BF16/FP16 1,671, FP8 3,341 TFLOPS "
                     "with sparsity (dense = half)"),
    "A100-SXM": Peak(19.5, 156.0, 312.0, 312.0, None,
                     "NVIDIA A100 Tensor Core GPU datasheet (SXM4): FP32 19.5; TF32 156, BF16/FP16 312 TFLOPS "
                     "dense (624 with sparsity); no FP8; nvidia.com/en-us/data-center/a100"),
    "A100-PCIe": Peak(19.5, 156.0, 312.0, 312.0, None,
                      "NVIDIA A100 Tensor Core GPU datasheet (PCIe): same peaks as SXM4: FP32 19.5; TF32 156, "
                      "BF16/FP16 312 TFLOPS dense; no FP8"),
    "L40S": Peak(91.6, 183.0, 362.05, 362.05, 733.0,
                 "NVIDIA L40S datasheet: FP32 91.6; TF32 366, BF16/FP16 733, FP8 1,466 TFLOPS with sparsity "
                 "(dense = half); nvidia.com/en-us/data-center/l40s"),
    "L4": Peak(30.3, 60.0, 121.0, 121.0, 242.5,
               "NVIDIA L4 datasheet: FP32 30.3; TF32 120, BF16/FP16 242, FP8 485 TFLOPS with sparsity "
               "(dense = half)"),
    "B200": Peak(80.0, 1100.0, 2250.0, 2250.0, 4500.0,
                 "NVIDIA HGX B200 datasheet (per GPU, 1,000 W): FP32 80; TF32 2.2, BF16/FP16 4.5, FP8 9 "
                 "PFLOPS with sparsity (dense = half); nvidia.com/en-us/data-center/hgx"),
    "MI300X": Peak(163.4, 653.7, 1307.4, 1307.4, 2614.9,
                   "AMD Instinct MI300X datasheet: FP32 163.4; TF32 653.7, BF16/FP16 1,307.4, FP8 2,614.9 "
                   "TFLOPS dense"),
}

# Device names as NVML / torch.cuda.get_device_name report them -> table key. First match wins,
# so the specific variants come before the family ("NVIDIA H100 80GB HBM3" is the SXM part).
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bH100\b.*\bPCIE\b", "H100-PCIe"),
    (r"\bH100\b.*\bNVL\b", "H100-NVL"),
    (r"\bH100\b", "H100-SXM"),
    (r"\bH200\b.*\bNVL\b", "H200-NVL"),
    (r"\bH200\b", "H200-SXM"),
    (r"\bA100\b.*\bPCIE\b", "A100-PCIe"),
    (r"\bA100\b", "A100-SXM"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bB200\b", "B200"),
    (r"\bMI300X\b", "MI300X"),
)


def device_key(name: str | None) -> str | None:
    """The table key of a device name ('NVIDIA H100 80GB HBM3' -> 'H100-SXM'), None when not listed."""
    if not name:
        return None
    if name in PEAKS_TFLOPS:
        return name
    upper = name.upper().replace("-", " ")
    return next((key for pattern, key in _NAME_PATTERNS if re.search(pattern, upper)), None)


def peak_flops_per_s(device: str, precision: str = DEFAULT_DTYPE) -> float:
    """Dense peak of a device (table key or device name) in FLOP/s. KeyError for a device not in
    the table, ValueError for a dtype it has no units for."""
    if precision not in DTYPES:
        raise ValueError(f"flopcount: dtype {precision!r} is not one of {', '.join(DTYPES)}")
    key = device_key(device)
    if key is None:
        raise KeyError(f"unknown device {device!r}; known: {', '.join(PEAKS_TFLOPS)}")
    value = getattr(PEAKS_TFLOPS[key], precision)
    if value is None:
        raise ValueError(f"{key} has no {precision} tensor cores")
    return value * 1e12


def achieved_flops_per_s(flops: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"step time {seconds!r} s must be positive")
    return flops / seconds


def mfu(flops: int, seconds: float, peak_flops_per_s: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: counted FLOPs / (devices x time x peak)."""
    return achieved_flops_per_s(flops, seconds) / (devices * peak_flops_per_s)


def hardware_estimate(devices: int, seconds: float, peak_flops_per_s: float,
                      utilisation: float = ASSUMED_UTILISATION) -> float:
    """The guidelines' hardware-based estimate: devices x time x peak x utilisation (FLOP)."""
    return devices * seconds * peak_flops_per_s * utilisation


def quantiles(values) -> dict | None:
    """Nearest-rank quantiles (always measured values) of a list of numbers, None when empty."""
    if not len(values):
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"steps": len(ordered), "min": ordered[0], "p10": at(0.1), "median": at(0.5), "p90": at(0.9),
            "max": ordered[-1]}


def cross_check(training_flops: int, device_seconds: dict[str, float], step_rates: dict[str, dict] | None = None,
                *, dtype: str = DEFAULT_DTYPE, utilisation: float = ASSUMED_UTILISATION) -> dict:
    """The hardware-based estimate beside the counted ``training_flops``.

    ``device_seconds``: device name -> device-seconds (devices x active time) of the run(s).
    ``step_rates``: device name -> quantiles (``quantiles()``) of the achieved training FLOP/s per
    device of each step; divided by the peak they are the MFU per step. Devices without a peak in
    the table (CPUs, unlisted GPUs) make the estimate unavailable rather than guessed."""
    if dtype not in DTYPES:
        raise ValueError(f"flopcount: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not 0 < utilisation <= 1:
        raise ValueError(f"flopcount: utilisation {utilisation!r} must be in (0, 1]")
    step_rates = step_rates or {}
    devices, missing, capacity = [], [], 0.0
    for name, seconds in sorted(device_seconds.items()):
        key = device_key(name)
        peak = getattr(PEAKS_TFLOPS[key], dtype) * 1e12 if key and getattr(PEAKS_TFLOPS[key], dtype) else None
        rates = step_rates.get(name)
        devices.append({"device": name, "table_key": key, "device_s": seconds, "peak_flops_per_s": peak,
                        "peak_source": PEAKS_TFLOPS[key].source if key else None,
                        "mfu_per_step": ({k: (v / peak if k != "steps" else v) for k, v in rates.items()}
                                         if rates and peak else None)})
        if peak is None:
            missing.append(name)
        else:
            capacity += seconds * peak
    result = {"method": HARDWARE_METHOD, "dtype": dtype, "utilisation_assumed": utilisation,
              "utilisation_note": "assumed by flopcount (a common planning value), not taken from the guidelines",
              "devices": devices, "step_rates": step_rates, "counted_training_flops": int(training_flops)}
    if not devices or missing or capacity <= 0:
        why = (f"no peak {dtype} FLOP/s in flopcount.hardware for: {', '.join(missing)}" if missing
               else "no device time recorded")
        return {**result, "available": False, "reason": why, "peak_flop": None, "estimate_flops": None,
                "implied_utilisation": None, "ratio_counted_to_estimate": None}
    estimate = capacity * utilisation
    return {**result, "available": True, "reason": None, "peak_flop": capacity, "estimate_flops": estimate,
            "implied_utilisation": training_flops / capacity, "ratio_counted_to_estimate": training_flops / estimate}


def recheck(estimate: dict, *, dtype: str = DEFAULT_DTYPE, utilisation: float = ASSUMED_UTILISATION) -> dict:
    """A summary's ``hardware_estimate`` again for another dtype or utilisation (same device time)."""
    return cross_check(estimate["counted_training_flops"], {d["device"]: d["device_s"] for d in estimate["devices"]},
                       estimate.get("step_rates"), dtype=dtype, utilisation=utilisation)
