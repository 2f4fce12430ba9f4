"""Energy metering on a real GPU: NVML's counter through flopcount against an independent power trace.

    python benchmarks/gpu/energy_check.py [--out DIR] [--steps 12] [--size 8192]   # ~1 minute on an H100/H200

What it checks, on the machine's first CUDA device (needs CUDA torch and nvidia-ml-py):

1. NVML sees the device torch uses: flopcount.energy.nvml_selector (UUID, else PCI bus id) finds an
   NVML handle whose name is torch's device name; the energy counter is supported and increases.
2. A metered run (flopcount.meter(out=DIR/trace)) of BF16 matmul steps writes per-step GPU energy with
   source ``nvml_energy_counter`` for every step, device name and count, and hardware time.
3. Each step's energy agrees with an independent reference: this script's own thread samples
   nvmlDeviceGetPowerUsage every 20 ms and integrates power x time over the same step intervals
   (the thread is the check's, not flopcount's: flopcount reads the counter at step boundaries
   only). NVML's power reading is a ~1 s moving average on recent GPUs, so agreement within 15 %
   per step (steps >= 0.5 s) and 5 % in total is the expectation.
4. The hardware-based cross-check: the implied MFU of the BF16 GEMMs is plausible (0.2 to 1.0 of
   the table's dense BF16 peak), and the estimate exists for the device.
5. The cost of one counter read (what flopcount adds per GPU per step), timed over 1,000 reads.
6. `flopcount report DIR/trace --form cop` fills the training energy ("measured", or "measured,
   incomplete" where the host's RAPL counters are not readable) and time fields.

Writes DIR/energy_check.json (all figures) and DIR/cop.md; exits 0 when every check holds, 1 when
one fails, 2 when there is no GPU or NVML.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


class PowerTrace(threading.Thread):
    """Reference only: power samples (time, W) every ``period`` seconds in a background thread."""

    def __init__(self, nvml, handle, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.nvml, self.handle, self.period = nvml, handle, period
        self.samples: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append((time.time(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0))
            time.sleep(self.period)

    def energy(self, start: float, end: float) -> float:
        """Trapezoid integral of the samples over [start, end] (J), interpolated at both ends."""
        import numpy as np

        times, watts = np.array(self.samples).T
        inside = (times > start) & (times < end)
        t = np.concatenate([[start], times[inside], [end]])
        w = np.concatenate([[np.interp(start, times, watts)], watts[inside], [np.interp(end, times, watts)]])
        return float(np.sum(np.diff(t) * (w[1:] + w[:-1]) / 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "energy_check_out"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--matmuls", type=int, default=600,
                        help="BF16 matmuls per step (600 of 8192^3: about 1 s on an H100)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    import flopcount
    from flopcount import energy as en
    from flopcount import hardware as hw

    if not torch.cuda.is_available():
        print("energy_check: no CUDA device; run this on a GPU machine", file=sys.stderr)
        return 2
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - any failure here means: no NVML to check
        print(f"energy_check: NVML unavailable ({e})", file=sys.stderr)
        return 2

    checks: dict[str, bool] = {}
    report: dict = {"torch": torch.__version__, "driver": str(pynvml.nvmlSystemGetDriverVersion())}
    torch.cuda.set_device(0)
    selector = en.nvml_selector(0)
    handle = (pynvml.nvmlDeviceGetHandleByUUID(selector) if selector.startswith(("GPU-", "MIG-"))
              else pynvml.nvmlDeviceGetHandleByPciBusId(selector))
    nvml_name = pynvml.nvmlDeviceGetName(handle)
    nvml_name = nvml_name.decode() if isinstance(nvml_name, bytes) else nvml_name
    report.update(selector=selector, nvml_name=nvml_name, torch_name=torch.cuda.get_device_name(0),
                  table_key=hw.device_key(nvml_name))
    checks["nvml_finds_torch_device"] = nvml_name == torch.cuda.get_device_name(0)
    first = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    start = time.perf_counter()
    for _ in range(1000):  # what flopcount adds per GPU per step
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    report["counter_read_us"] = (time.perf_counter() - start) * 1e3

    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):  # warm-up outside the meter: cuBLAS heuristics, clocks
        a @ b
    torch.cuda.synchronize()

    trace_dir = out / "trace"
    reference = PowerTrace(pynvml, handle)
    reference.start()
    time.sleep(1.5)  # let the moving average settle
    with flopcount.meter(out=str(trace_dir), run_id="energy-check", base_model="meta-llama/Llama-3.1-8B",
                         backend="dispatch") as m:
        for _ in range(args.steps):
            for _ in range(args.matmuls):
                a @ b
            torch.cuda.synchronize()  # the step ends when its kernels have run
            m.step(tokens=args.size)
    time.sleep(1.5)
    reference.stop_event.set()
    reference.join()
    checks["counter_increases"] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) > first

    frame = flopcount.read_trace(str(trace_dir))
    steps = []
    for row in frame.itertuples():
        ref = reference.energy(row.start_time, row.end_time)
        steps.append({"step": int(row.step), "seconds": row.end_time - row.start_time, "gpu_j": row.gpu_energy_j,
                      "source": row.gpu_energy_source, "reference_j": ref,
                      "ratio": row.gpu_energy_j / ref if row.gpu_energy_j and ref else None})
    report["steps"] = steps
    measured = [s for s in steps[1:] if s["ratio"] is not None]  # step 0 includes the meter's start-up
    checks["every_step_from_the_counter"] = all(s["source"] == en.NVML_COUNTER for s in steps)
    checks["device_columns"] = bool((frame.device_name == nvml_name).all() and (frame.device_count == 1).all())
    checks["per_step_within_15pct"] = bool(measured) and all(abs(s["ratio"] - 1) <= 0.15 for s in measured)
    total, ref_total = sum(s["gpu_j"] for s in measured), sum(s["reference_j"] for s in measured)
    report["total_j"], report["reference_total_j"] = total, ref_total
    checks["total_within_5pct"] = ref_total > 0 and abs(total / ref_total - 1) <= 0.05

    summary = flopcount.summarize(str(trace_dir))
    report["time"], report["energy"] = summary["time"], summary["energy"]
    report["hardware_estimate"] = summary["hardware_estimate"]
    mfu = summary["hardware_estimate"].get("implied_utilisation")
    checks["cross_check_available"] = bool(summary["hardware_estimate"]["available"])
    checks["mfu_plausible"] = mfu is not None and 0.2 <= mfu <= 1.0
    checks["gpu_energy_complete"] = summary["energy"]["gpu_rows_missing"] == 0  # CPU (RAPL) may be unreadable

    cop = subprocess.run([sys.executable, "-m", "flopcount.cli", "report", str(trace_dir), "--form", "cop",
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    md = subprocess.run([sys.executable, "-m", "flopcount.cli", "report", str(trace_dir), "--form", "cop"],
                        capture_output=True, text=True, timeout=120)
    (out / "cop.md").write_text(md.stdout + md.stderr)
    fields = {f["field"]: f for f in json.loads(cop.stdout)["fields"]} if cop.returncode == 0 else {}
    # "measured, incomplete" when the host's RAPL counters are not readable: the GPU figure is still measured
    checks["cop_energy_measured"] = str(fields.get("Amount of energy used for training", {}).get("status")).startswith(
        "measured")
    checks["cop_time_measured"] = fields.get("Training time", {}).get("status") == "measured"

    report["checks"] = checks
    (out / "energy_check.json").write_text(json.dumps(report, indent=2, default=str))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"device {nvml_name}: {len(measured)} steps, {total:.1f} J by the counter vs {ref_total:.1f} J by "
          f"the power trace; MFU {mfu if mfu is None else f'{mfu:.1%}'}; one counter read "
          f"{report['counter_read_us']:.1f} us")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
