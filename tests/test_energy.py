"""Energy per step: NVML counters (a scripted stand-in at the pynvml boundary), RAPL (a temporary
powercap tree), wrap-around, resets, missing counters and a device that disappears mid-run;
training time, hardware-days and the hardware-based cross-check in closed form."""
from __future__ import annotations

import os

import pynvml
import pytest

from flopcount import energy as en
from flopcount import hardware as hw


class FakeNvml:
    """The part of pynvml that flopcount calls, with scripted readings per device.

    ``devices``: NVML index -> {"name": str, "energy": [mJ or NVML error code, ...],
    "power": [mW or error code, ...]}. Each call consumes the next scripted value; the error
    classes and codes are pynvml's own, so flopcount's error handling meets the real hierarchy."""

    NVMLError = pynvml.NVMLError

    def __init__(self, devices: dict) -> None:
        for name in dir(pynvml):
            if name.startswith("NVML_ERROR_"):
                setattr(self, name, getattr(pynvml, name))
        self.devices = {i: {"name": d["name"], "energy": list(d.get("energy", [pynvml.NVML_ERROR_NOT_SUPPORTED] * 99)),
                            "power": list(d.get("power", [pynvml.NVML_ERROR_NOT_SUPPORTED] * 99))}
                        for i, d in devices.items()}
        self.calls: list[tuple[str, int]] = []

    def _next(self, handle: int, what: str):
        self.calls.append((what, handle))
        value = self.devices[handle][what].pop(0)
        if isinstance(value, tuple):  # ("error", code)
            raise pynvml.NVMLError(value[1])
        return value

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.devices:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetName(self, handle):
        return self.devices[handle]["name"]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self._next(handle, "energy")

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._next(handle, "power")


def err(code: int) -> tuple:
    return ("error", code)


H100 = "NVIDIA H100 80GB HBM3"
NOT_SUPPORTED = err(pynvml.NVML_ERROR_NOT_SUPPORTED)


def gpu_meter(devices: dict) -> tuple[en.EnergyMeter, FakeNvml]:
    nvml = FakeNvml(devices)
    gpus, problem = en.open_gpus(nvml, sorted(devices))
    assert problem is None
    return en.EnergyMeter(gpus, None, cpu_name="test cpu"), nvml


def run_steps(meter: en.EnergyMeter, times: list[float]) -> list[en.StepEnergy]:
    meter.start(times[0])
    return [meter.sample(t) for t in times[1:]]


def test_counter_deltas_per_step_and_device_sum():
    meter, _ = gpu_meter({0: {"name": H100, "energy": [1_000, 3_500, 9_500]},
                          1: {"name": H100, "energy": [20_000, 20_700, 21_000]}})
    steps = run_steps(meter, [100.0, 101.0, 102.0])
    # (3500-1000 + 20700-20000) mJ, then (9500-3500 + 21000-20700) mJ
    assert [s.gpu_j for s in steps] == [pytest.approx(3.2), pytest.approx(6.3)]
    assert {s.gpu_source for s in steps} == {en.NVML_COUNTER}
    assert [s.gpu_devices for s in steps] == [2, 2]
    assert (meter.device_name, meter.device_count, meter.device_kind) == (H100, 2, "gpu")
    assert steps[0].cpu_source == en.RAPL_OTHER_RANK and steps[0].cpu_j is None


def test_counter_wraps_around_at_its_range():
    top = 2**64
    meter, _ = gpu_meter({0: {"name": H100, "energy": [top - 500, 1_500, 4_000]}})
    steps = run_steps(meter, [0.0, 5.0, 10.0])
    assert [s.gpu_j for s in steps] == [pytest.approx((500 + 1_500) / 1000), pytest.approx(2.5)]


def test_counter_reset_gives_no_figure_for_that_step_only():
    # 5e9 mJ -> 10 mJ would be 2**64 mJ of wrap in 1 s: a reset (driver reload), not energy.
    meter, _ = gpu_meter({0: {"name": H100, "energy": [5_000_000_000, 10, 2_010]}})
    steps = run_steps(meter, [0.0, 1.0, 2.0])
    assert steps[0].gpu_j is None and steps[0].gpu_source == en.UNAVAILABLE and steps[0].gpu_devices == 0
    assert steps[1].gpu_j == pytest.approx(2.0) and steps[1].gpu_source == en.NVML_COUNTER


def test_missing_counter_falls_back_to_power_times_time():
    meter, nvml = gpu_meter({0: {"name": "Tesla P100-PCIE-16GB", "energy": [NOT_SUPPORTED],
                                 "power": [200_000, 300_000, 300_000]}})
    steps = run_steps(meter, [10.0, 12.0, 13.5])
    # trapezoid: (200 W + 300 W) / 2 x 2 s, then 300 W x 1.5 s
    assert [s.gpu_j for s in steps] == [pytest.approx(500.0), pytest.approx(450.0)]
    assert {s.gpu_source for s in steps} == {en.NVML_POWER}
    assert nvml.calls.count(("energy", 0)) == 1  # the counter is asked once, not at every step
    assert "power x time" in meter.describe()["gpus"][0]["reason"]


def test_no_counter_and_no_power_is_unavailable_not_zero():
    meter, _ = gpu_meter({0: {"name": H100, "energy": [NOT_SUPPORTED], "power": [NOT_SUPPORTED]}})
    steps = run_steps(meter, [0.0, 1.0, 2.0])
    assert all(s.gpu_j is None and s.gpu_source == en.UNAVAILABLE for s in steps)
    assert meter.describe()["gpus"][0]["source"] == en.UNAVAILABLE


def test_device_that_disappears_mid_run():
    lost = err(pynvml.NVML_ERROR_GPU_IS_LOST)
    meter, nvml = gpu_meter({0: {"name": H100, "energy": [0, 1_000, 2_000, 3_000]},
                             1: {"name": H100, "energy": [0, 4_000, lost]}})
    steps = run_steps(meter, [0.0, 1.0, 2.0, 3.0])
    assert [(s.gpu_j, s.gpu_devices) for s in steps] == [(pytest.approx(5.0), 2), (pytest.approx(1.0), 1),
                                                         (pytest.approx(1.0), 1)]
    assert nvml.calls.count(("energy", 1)) == 3  # not asked again once lost
    described = meter.describe()["gpus"][1]
    assert described["source"] == en.UNAVAILABLE and "GPU is lost" in described["reason"]
    assert meter.device_count == 2  # the device still counts: it was used


def test_transient_error_costs_two_intervals_then_recovers():
    timeout = err(pynvml.NVML_ERROR_TIMEOUT)
    meter, _ = gpu_meter({0: {"name": H100, "energy": [0, timeout, 5_000, 8_000]}})
    steps = run_steps(meter, [0.0, 1.0, 2.0, 3.0])
    # the failed read has no figure; the next read only re-establishes the baseline
    assert [s.gpu_j for s in steps] == [None, None, pytest.approx(3.0)]


def test_no_gpu_means_source_none():
    meter = en.EnergyMeter([], None, cpu_name="Some CPU")
    steps = run_steps(meter, [0.0, 1.0])
    assert (steps[0].gpu_j, steps[0].gpu_source) == (None, en.NO_DEVICE)
    assert (meter.device_name, meter.device_count, meter.device_kind) == ("Some CPU", 1, "cpu")


# ---- RAPL -----------------------------------------------------------------------------------

def make_zone(root, entry: str, name: str, energy_uj: int, range_uj: int = 262_143_328_850) -> str:
    path = root / entry
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return str(path)


def set_energy(path: str, value: int) -> None:
    with open(os.path.join(path, "energy_uj"), "w") as f:
        f.write(f"{value}\n")


def test_rapl_sums_packages_and_dram_but_not_psys_or_mmio(tmp_path):
    pkg0 = make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    dram0 = make_zone(tmp_path, "intel-rapl:0/intel-rapl:0:2", "dram", 50_000)
    core0 = make_zone(tmp_path, "intel-rapl:0/intel-rapl:0:0", "core", 7)
    pkg1 = make_zone(tmp_path, "intel-rapl:1", "package-1", 2_000_000)
    make_zone(tmp_path, "intel-rapl:2", "psys", 0)
    make_zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0)
    # sysfs lists subzones at the top level too (as links); so does this tree
    os.symlink(dram0, tmp_path / "intel-rapl:0:2")
    os.symlink(core0, tmp_path / "intel-rapl:0:0")
    cpu = en.RaplEnergy.open(str(tmp_path))
    assert sorted(z.name for z in cpu.zones) == ["dram", "package-0", "package-1"]
    meter = en.EnergyMeter([], cpu, cpu_name="x")
    meter.start(0.0)
    set_energy(pkg0, 31_000_000)
    set_energy(dram0, 2_050_000)
    set_energy(pkg1, 12_000_000)
    step = meter.sample(1.0)
    assert step.cpu_source == en.RAPL
    assert step.cpu_j == pytest.approx(30.0 + 2.0 + 10.0)


def test_rapl_wraps_at_max_energy_range(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 900_000, range_uj=1_000_000)
    cpu = en.RaplEnergy.open(str(tmp_path))
    cpu.start(0.0)
    set_energy(pkg, 100_000)
    assert cpu.read(1.0) == pytest.approx((1_000_000 - 900_000 + 100_000) / 1e6)


def test_rapl_missing_or_unreadable_is_unavailable(tmp_path):
    meter = en.EnergyMeter([], en.RaplEnergy.open(str(tmp_path / "absent")), cpu_name="x")
    steps = run_steps(meter, [0.0, 1.0])
    assert (steps[0].cpu_j, steps[0].cpu_source) == (None, en.UNAVAILABLE)
    assert "does not exist" in meter.describe()["cpu"]["reason"]
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 5)
    os.remove(os.path.join(pkg, "energy_uj"))
    os.mkdir(os.path.join(pkg, "energy_uj"))  # unreadable as a number (a permission error reads the same way)
    cpu = en.RaplEnergy.open(str(tmp_path))
    cpu.start(0.0)
    assert cpu.source == en.UNAVAILABLE and cpu.read(1.0) is None and "could not be read" in cpu.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: no permission error to provoke")
def test_rapl_root_only_counter(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", 5)
    os.chmod(os.path.join(pkg, "energy_uj"), 0)
    cpu = en.RaplEnergy.open(str(tmp_path))
    cpu.start(0.0)
    assert cpu.source == en.UNAVAILABLE and "root only" in cpu.reason


def test_only_local_rank_zero_reads_the_hosts_cpu(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 5)
    other = en.open_energy_meter(2, rapl_root=str(tmp_path), local_rank=1)
    first = en.open_energy_meter(2, rapl_root=str(tmp_path), local_rank=0)
    assert other.cpu is None and first.cpu is not None and first.cpu.source == en.RAPL
    assert other.sample(1.0).cpu_source == en.RAPL_OTHER_RANK


# ---- time, hardware-days, cross-check --------------------------------------------------------

def tally_rows() -> list[dict]:
    rows = []
    # run a: 2 ranks x 4 GPUs, 2 steps of 1 h each; rank 1's second step lost a GPU's figure
    for rank in (0, 1):
        for step in range(2):
            rows.append(dict(run_id="a", rank=rank, start_time=step * 3600.0, end_time=(step + 1) * 3600.0,
                             training_flops=10**18 * (step + 1), device_name=H100, device_count=4,
                             gpu_energy_j=4 * 700 * 3600.0, gpu_energy_source=en.NVML_COUNTER,
                             gpu_energy_devices=3 if (rank, step) == (1, 1) else 4,
                             cpu_energy_j=300 * 3600.0 if rank == 0 else None,
                             cpu_energy_source=en.RAPL if rank == 0 else en.RAPL_OTHER_RANK))
    # run b starts half-way through run a's second hour and ends 1 h later: union = 2.5 h
    rows.append(dict(run_id="b", rank=0, start_time=5400.0, end_time=9000.0, training_flops=10**18,
                     device_name=H100, device_count=8, gpu_energy_j=None, gpu_energy_source=en.UNAVAILABLE,
                     gpu_energy_devices=0, cpu_energy_j=None, cpu_energy_source=en.UNAVAILABLE))
    # an old trace's row: no device or energy columns
    rows.append(dict(run_id="c", rank=0, start_time=100_000.0, end_time=100_010.0, training_flops=5,
                     device_name=None, device_count=None, gpu_energy_j=None, gpu_energy_source=None,
                     gpu_energy_devices=None, cpu_energy_j=None, cpu_energy_source=None))
    return rows


def fill(tally: en.ResourceTally, rows: list[dict], vectorised: bool) -> en.ResourceTally:
    if vectorised:
        import pyarrow as pa

        from flopcount.trace.schema import STEPS_SCHEMA

        schema = pa.schema([STEPS_SCHEMA.field(c) for c in en.RESOURCE_COLUMNS])
        tally.add_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
    else:
        for r in rows:
            tally.add(r["run_id"], r["rank"], r["start_time"], r["end_time"], r["training_flops"],
                      device_name=r["device_name"], device_count=r["device_count"], gpu_j=r["gpu_energy_j"],
                      gpu_source=r["gpu_energy_source"], gpu_devices=r["gpu_energy_devices"],
                      cpu_j=r["cpu_energy_j"], cpu_source=r["cpu_energy_source"], trailing=r.get("trailing", False))
    return tally


@pytest.mark.parametrize("vectorised", [False, True], ids=["per-row", "batch"])
def test_tally_time_hardware_days_and_energy_totals(vectorised):
    tally = fill(en.ResourceTally(), tally_rows(), vectorised)
    day = en.SECONDS_PER_DAY
    time = tally.time_summary()
    assert time["wall_clock_s"] == pytest.approx(9000.0 + 10.0)
    assert time["hardware_s"] is None  # run c recorded no devices: hardware time is not invented
    runs = {r["run_id"]: r for r in time["runs"]}
    assert runs["a"]["hardware_s"] == pytest.approx(2 * 4 * 7200.0)
    assert runs["a"]["hardware_days"] == pytest.approx(2 * 4 * 7200.0 / day)
    assert runs["b"]["hardware_s"] == pytest.approx(8 * 3600.0)
    assert (runs["a"]["devices"], runs["a"]["ranks"], runs["b"]["devices"]) == ({H100: 8}, 2, {H100: 8})
    assert time["devices"] == {H100: 8} and time["device_count"] == 8
    assert tally.device_seconds == {H100: pytest.approx(2 * 4 * 7200.0 + 8 * 3600.0)}
    assert sorted(tally.step_rates[H100]) == pytest.approx(sorted(
        [10**18 / (4 * 3600.0)] * 2 + [2 * 10**18 / (4 * 3600.0)] * 2 + [10**18 / (8 * 3600.0)]))
    energy = tally.energy_summary()
    gpu = 4 * 4 * 700 * 3600.0
    cpu = 2 * 300 * 3600.0
    assert energy["gpu_j"] == pytest.approx(gpu) and energy["cpu_j"] == pytest.approx(cpu)
    assert energy["total_mwh"] == pytest.approx((gpu + cpu) / 3.6e9)
    assert energy["gpu_rows_missing"] == 3  # rank 1 step 1 (3 of 4 GPUs), run b, run c
    assert energy["cpu_rows_missing"] == 2  # runs b and c: rank 1's CPU is in rank 0's rows
    assert energy["gpu_sources"] == {en.NVML_COUNTER: 4, en.UNAVAILABLE: 2}
    assert energy["complete"] is False and "lower bound" in energy["coverage"]
    assert tally.rows == 6 and tally.rows_without_devices == 1


def test_project_time_over_runs_that_all_recorded_devices():
    rows = [r for r in tally_rows() if r["run_id"] != "c"]
    time = fill(en.ResourceTally(), rows, True).time_summary()
    assert time["wall_clock_s"] == pytest.approx(9000.0)
    assert time["hardware_days"] == pytest.approx((2 * 4 * 7200.0 + 8 * 3600.0) / en.SECONDS_PER_DAY)


def test_rate_sample_is_bounded_and_exact_while_small():
    sample = en._Sample(size=100)
    sample.add(range(60))
    assert sorted(sample.tolist()) == list(range(60))
    sample.add(range(60, 1000))
    kept = sample.tolist()
    assert len(kept) == 100 == len(set(kept)) and set(kept) <= set(range(1000))


def test_union_of_run_intervals():
    assert en._union_length([(0, 10), (5, 12), (20, 21)]) == 13
    assert en._union_length([]) is None


def test_device_names_map_to_the_peak_table():
    names = {"NVIDIA H100 80GB HBM3": "H100-SXM", "NVIDIA H100 PCIe": "H100-PCIe", "NVIDIA H100 NVL": "H100-NVL",
             "NVIDIA H200": "H200-SXM", "NVIDIA H200 NVL": "H200-NVL", "NVIDIA A100-SXM4-80GB": "A100-SXM",
             "NVIDIA A100-PCIE-40GB": "A100-PCIe", "NVIDIA A100 80GB PCIe": "A100-PCIe", "NVIDIA L40S": "L40S",
             "NVIDIA L4": "L4", "NVIDIA B200": "B200", "AMD Instinct MI300X": "MI300X",
             "NVIDIA GH200 480GB": None, "Intel(R) Xeon(R) Platinum 8480+": None}
    assert {n: hw.device_key(n) for n in names} == names
    for key, peak in hw.PEAKS_TFLOPS.items():
        assert peak.bf16 == peak.fp16 > peak.fp32 and peak.source, key
        assert peak.tf32 is None or peak.fp32 < peak.tf32 < peak.bf16, key
        assert peak.fp8 is None or peak.fp8 == pytest.approx(2 * peak.bf16, rel=0.02), key
    assert hw.peak_flops_per_s("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    with pytest.raises(ValueError):
        hw.peak_flops_per_s("A100-SXM", "fp8")
    with pytest.raises(KeyError):
        hw.peak_flops_per_s("TPU-v9")


def test_cross_check_closed_form():
    device_s = {"NVIDIA H100 80GB HBM3": 8 * 3600.0}
    counted = 10**19
    rates = {"NVIDIA H100 80GB HBM3": hw.quantiles([500e12, 300e12, 400e12])}
    result = hw.cross_check(counted, device_s, rates, dtype="bf16", utilisation=0.4)
    capacity = 8 * 3600.0 * 989.4e12
    assert result["available"] and result["peak_flop"] == pytest.approx(capacity)
    assert result["estimate_flops"] == pytest.approx(0.4 * capacity)
    assert result["implied_utilisation"] == pytest.approx(counted / capacity)
    assert result["ratio_counted_to_estimate"] == pytest.approx(counted / (0.4 * capacity))
    mfu = result["devices"][0]["mfu_per_step"]
    assert (mfu["steps"], mfu["min"], mfu["median"], mfu["max"]) == (
        3, pytest.approx(300 / 989.4), pytest.approx(400 / 989.4), pytest.approx(500 / 989.4))
    fp8 = hw.recheck(result, dtype="fp8", utilisation=0.5)
    assert fp8["estimate_flops"] == pytest.approx(0.5 * 8 * 3600.0 * 1978.9e12)
    assert fp8["devices"][0]["mfu_per_step"]["max"] == pytest.approx(500 / 1978.9)
    cpu_only = hw.cross_check(counted, {"Intel(R) Xeon(R) CPU": 3600.0})
    assert cpu_only["available"] is False and cpu_only["estimate_flops"] is None
    assert "Intel(R) Xeon(R) CPU" in cpu_only["reason"]
