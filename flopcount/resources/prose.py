"""The sentences a summary carries about its time and energy figures (what they cover)."""
from __future__ import annotations

TIME_SOURCE = ("wall clock: first step start to last step end of each run (union over runs); "
               "hardware time: devices x step durations of every rank; devices from each rank's "
               "environment (CUDA devices it trains on, else its CPU)")
TIME_SOURCE_WITHOUT_DEVICES = ("wall clock from the step times; hardware time unavailable: the trace records no "
                               "devices (written before flopcount recorded them)")


def coverage_text(uses_gpu: bool, gpu_j, cpu_j, complete: bool) -> str:
    parts = []
    if uses_gpu:
        parts.append("GPU boards (NVML)" if gpu_j is not None else "GPU energy unavailable")
    parts.append("CPU packages and DRAM (RAPL)" if cpu_j is not None else "CPU energy unavailable")
    text = "; ".join(parts)
    if gpu_j is None and cpu_j is None:
        return f"no energy figure was measured ({text})"
    if not complete:
        text += "; some step rows have no figure, so the total is a lower bound"
    return text + ("; not measured: other host components (memory outside RAPL, disks, network), cooling and "
                   "facility overhead (PUE)")

