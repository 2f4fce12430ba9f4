"""Energy and training time per step and per rank (AI Act Annex XI; the Code of Practice form).

GPU: NVML's cumulative energy counter (``nvmlDeviceGetTotalEnergyConsumption``, millijoules
since the driver loaded), read once per device at each step boundary. No thread polls in the
background: a cumulative counter read at the boundaries gives each step's energy whatever
happened between the reads. Where a device has no counter (NVML_ERROR_NOT_SUPPORTED: GPUs
before Volta), its power draw (``nvmlDeviceGetPowerUsage``) at the two boundaries times the
step's duration stands in (trapezoid rule), with its own source label.

CPU: RAPL package (and DRAM) counters under /sys/class/powercap where readable (most kernels
since 2020 make ``energy_uj`` readable by root only). A CPU package is shared by the ranks of
its host, so only local rank 0 reads it; the other local ranks record the source
``rapl_local_rank_0`` and no figure, so that summing ranks never counts a package twice.

Every figure comes with its source; where there is none, the figure is None (null in the
trace) and the source ``unavailable`` -- never an invented number. Counters that wrap are
unwrapped with their range (RAPL ``max_energy_range_uj``; NVML's is 2**64 mJ); a jump that
would mean more than ``MAX_PLAUSIBLE_W`` is a counter reset, and that step has no figure.
A device that disappears mid-run (NVML_ERROR_GPU_IS_LOST and kin) gives no figure from then
on, and the step rows say how many of the rank's devices their figure covers.
"""
from __future__ import annotations

import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# Sources of a step's energy figure (trace columns gpu_energy_source / cpu_energy_source).
NVML_COUNTER = "nvml_energy_counter"
NVML_POWER = "nvml_power_x_time"
RAPL = "rapl"
RAPL_OTHER_RANK = "rapl_local_rank_0"  # this host's CPU energy is in local rank 0's rows
UNAVAILABLE = "unavailable"
NO_DEVICE = "none"                   # the rank used no device of this kind (a CPU-only run's GPUs)
MEASURED_SOURCES = frozenset({NVML_COUNTER, NVML_POWER, RAPL})

CPU_DEVICE_KIND = "cpu"
RAPL_ROOT = "/sys/class/powercap"
MAX_PLAUSIBLE_W = 10_000.0   # above any one GPU board or CPU package: a bigger jump is a reset
MIN_PLAUSIBILITY_WINDOW_S = 1.0  # counters update every few ms to 100 ms; never judge a shorter gap
J_PER_MWH = 3.6e9
J_PER_KWH = 3.6e6
SECONDS_PER_DAY = 86_400.0

# NVML errors after which a device is gone for the rest of the run (others may be transient).
_LOST_ERRORS = ("NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_NOT_FOUND", "NVML_ERROR_GPU_NOT_FOUND",
                "NVML_ERROR_RESET_REQUIRED", "NVML_ERROR_UNINITIALIZED", "NVML_ERROR_DRIVER_NOT_LOADED")
_MISSING_ERRORS = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_NO_PERMISSION")


# ---- counters ---------------------------------------------------------------------------------

def counter_delta(previous: int, current: int, wrap: int) -> int:
    """Increase of a cumulative counter that wraps to 0 after ``wrap`` units."""
    return current - previous if current >= previous else current + wrap - previous


@dataclass
class CumulativeCounter:
    """Per-interval increases of one cumulative energy counter, in joules.

    ``unit_j``: joules per counter unit (NVML 1e-3, RAPL 1e-6); ``wrap``: the counter's range."""

    unit_j: float
    wrap: int
    last: int | None = None
    last_time: float | None = None

    def delta(self, value: int, now: float) -> float | None:
        """Joules since the previous value; None for the first value and after a reset."""
        previous, previous_time = self.last, self.last_time
        self.last, self.last_time = int(value), now
        if previous is None:
            return None
        joules = counter_delta(previous, int(value), self.wrap) * self.unit_j
        if joules > MAX_PLAUSIBLE_W * max(now - previous_time, MIN_PLAUSIBILITY_WINDOW_S):
            return None  # the counter restarted (driver reload, device reset): this interval is unknown
        return joules

    def forget(self) -> None:
        """After a failed read: the next value only re-establishes the baseline."""
        self.last = self.last_time = None


def _nvml_error_name(nvml, error) -> str:
    value = getattr(error, "value", None)
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == value:
            return name
    return "NVML_ERROR_UNKNOWN"


class NvmlDevice:
    """One GPU as NVML sees it: the energy of each interval between two ``read()`` calls."""

    def __init__(self, nvml, handle, name: str) -> None:
        self.nvml, self.handle, self.name = nvml, handle, name
        self.counter = CumulativeCounter(unit_j=1e-3, wrap=2**64)  # uint64 millijoules
        self.source = NVML_COUNTER
        self.reason: str | None = None      # why figures are (or became) unavailable
        self.lost_at: float | None = None
        self.last_power_w: float | None = None
        self.last_time: float | None = None

    def start(self, now: float) -> None:
        """Pick the source (counter, else power x time, else none) and take the baseline."""
        try:
            self.counter.delta(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle), now)
            return
        except self.nvml.NVMLError as e:
            if _nvml_error_name(self.nvml, e) not in _MISSING_ERRORS:
                self._fail(e, now)
                return
            counter_error = str(e)
        try:
            self.source = NVML_POWER
            self.last_power_w, self.last_time = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0, now
            self.reason = f"energy counter unavailable ({counter_error}); power x time instead"
        except self.nvml.NVMLError as e:
            self.source = UNAVAILABLE
            self.reason = f"neither energy counter ({counter_error}) nor power reading ({e})"

    def read(self, now: float) -> float | None:
        """Joules since the previous read (None: no figure for this interval)."""
        if self.source == UNAVAILABLE or self.lost_at is not None:
            return None
        try:
            if self.source == NVML_COUNTER:
                return self.counter.delta(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle), now)
            power_w = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except self.nvml.NVMLError as e:
            self._fail(e, now)
            return None
        previous_w, previous_time = self.last_power_w, self.last_time
        self.last_power_w, self.last_time = power_w, now
        if previous_w is None:
            return None
        return (previous_w + power_w) / 2.0 * max(now - previous_time, 0.0)

    def _fail(self, error, now: float) -> None:
        name = _nvml_error_name(self.nvml, error)
        self.counter.forget()
        self.last_power_w = None
        if name in _LOST_ERRORS:
            self.lost_at = now
            self.reason = f"device stopped answering at {now:.3f} ({error}); no figures from then on"
        else:
            self.reason = f"read failed ({error}); that interval has no figure"

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source if self.lost_at is None else UNAVAILABLE,
                "reason": self.reason}


@dataclass
class RaplZone:
    path: str
    name: str
    counter: CumulativeCounter


def _read_int(path: str) -> int:
    descriptor = os.open(path, os.O_RDONLY)  # the raw calls: a third of open()'s cost per step
    try:
        return int(os.read(descriptor, 64))
    finally:
        os.close(descriptor)


def rapl_zones(root: str = RAPL_ROOT) -> tuple[list[RaplZone], str | None]:
    """The RAPL zones whose sum is the CPUs' energy: every package, plus DRAM where it is its own
    zone. ``psys`` (the whole platform, overlapping the packages) and the MMIO duplicates
    (intel-rapl-mmio) are left out. Returns (zones, why none are usable)."""
    if not os.path.isdir(root):
        return [], f"no RAPL interface ({root} does not exist)"
    zones = []
    for entry in sorted(os.listdir(root)):
        if not re.fullmatch(r"intel-rapl:\d+(:\d+)?", entry):
            continue
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "name")) as f:
                name = f.read().strip()
            wrap = _read_int(os.path.join(path, "max_energy_range_uj"))
        except (OSError, ValueError):
            continue
        top_level = entry.count(":") == 1
        if (top_level and name.startswith("package")) or (not top_level and name == "dram"):
            zones.append(RaplZone(path, name, CumulativeCounter(unit_j=1e-6, wrap=wrap)))
    if not zones:
        return [], f"no RAPL package zone under {root}"
    return zones, None


class RaplEnergy:
    """The CPU packages' (and DRAM's) energy of each interval between two ``read()`` calls."""

    def __init__(self, zones: list[RaplZone], reason: str | None = None) -> None:
        self.zones = zones
        self.reason = reason
        self.source = RAPL if zones else UNAVAILABLE

    @classmethod
    def open(cls, root: str = RAPL_ROOT) -> "RaplEnergy":
        zones, reason = rapl_zones(root)
        return cls(zones, reason)

    def start(self, now: float) -> None:
        if self.zones:
            self.read(now)
            if self.reason and self.source == RAPL:  # the very first read failed: not readable here
                self.source = UNAVAILABLE

    def read(self, now: float) -> float | None:
        if self.source != RAPL:
            return None
        total, complete = 0.0, True
        for zone in self.zones:
            try:
                joules = zone.counter.delta(_read_int(os.path.join(zone.path, "energy_uj")), now)
            except PermissionError:
                self.reason = (f"{zone.path}/energy_uj is not readable by this user (root only on most kernels; "
                               "see docs/energy.md)")
                zone.counter.forget()
                joules = None
            except (OSError, ValueError) as e:
                self.reason = f"{zone.path}/energy_uj could not be read ({e})"
                zone.counter.forget()
                joules = None
            if joules is None:
                complete = False
            else:
                total += joules
        return total if complete else None

    def describe(self) -> dict:
        return {"source": self.source, "zones": [f"{z.name} ({z.path})" for z in self.zones], "reason": self.reason}


# ---- one rank's energy meter ------------------------------------------------------------------

@dataclass(frozen=True)
class StepEnergy:
    """One step of one rank: energy (J) with its source, and the devices it covers."""

    gpu_j: float | None
    gpu_source: str
    gpu_devices: int          # GPUs whose energy is in gpu_j (of device_count)
    cpu_j: float | None
    cpu_source: str


class EnergyMeter:
    """Reads the rank's GPUs and (on local rank 0) its host's CPU packages at step boundaries."""

    def __init__(self, gpus: list[NvmlDevice], cpu: RaplEnergy | None, *, cpu_name: str = "cpu",
                 gpu_note: str | None = None) -> None:
        self.gpus = gpus
        self.cpu = cpu            # None: another local rank reads this host's CPU energy
        self.cpu_name = cpu_name
        self.gpu_note = gpu_note  # why no GPU is metered (no CUDA, NVML missing, ...)

    @property
    def device_name(self) -> str:
        """The device type this rank trains on: its GPUs' name(s), else its CPU's."""
        if not self.gpus:
            return self.cpu_name
        return ", ".join(dict.fromkeys(g.name for g in self.gpus))

    @property
    def device_count(self) -> int:
        return len(self.gpus) or 1

    @property
    def device_kind(self) -> str:
        return "gpu" if self.gpus else CPU_DEVICE_KIND

    def start(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for gpu in self.gpus:
            gpu.start(now)
        if self.cpu is not None:
            self.cpu.start(now)

    def sample(self, now: float | None = None) -> StepEnergy:
        """The energy since the previous sample (the step that just closed)."""
        now = time.time() if now is None else now
        figures = [(gpu.read(now), gpu.source) for gpu in self.gpus]
        measured = [(joules, source) for joules, source in figures if joules is not None]
        if not self.gpus:
            gpu_j, gpu_source = None, NO_DEVICE
        elif not measured:
            gpu_j, gpu_source = None, UNAVAILABLE
        else:
            gpu_j = sum(joules for joules, _ in measured)
            gpu_source = "+".join(sorted({source for _, source in measured}))
        if self.cpu is None:
            cpu_j, cpu_source = None, RAPL_OTHER_RANK
        else:
            cpu_j = self.cpu.read(now)
            cpu_source = RAPL if cpu_j is not None else UNAVAILABLE
        return StepEnergy(gpu_j, gpu_source, len(measured), cpu_j, cpu_source)

    def describe(self) -> dict:
        """What is metered and how: written into the trace manifest's segment entry."""
        return {"device_kind": self.device_kind, "device_name": self.device_name, "device_count": self.device_count,
                "gpus": [g.describe() for g in self.gpus], "gpu_note": self.gpu_note,
                "cpu": self.cpu.describe() if self.cpu is not None else {"source": RAPL_OTHER_RANK, "reason": None}}


def energy_row(step: StepEnergy | None, meter: EnergyMeter | None) -> tuple:
    """A step's device and energy values for the trace's steps table, in schema order
    (device_name, device_count, gpu_energy_j, gpu_energy_source, gpu_energy_devices, cpu_energy_j,
    cpu_energy_source)."""
    device = (meter.device_name, meter.device_count) if meter is not None else (None, None)
    if step is None:
        return (*device, None, None, None, None, None)
    return (*device, step.gpu_j, step.gpu_source, step.gpu_devices, step.cpu_j, step.cpu_source)


# ---- opening the meter for a process ----------------------------------------------------------

def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def cuda_devices(world_size: int, requested: list[int] | None = None) -> list[int]:
    """The CUDA device indices (as torch numbers them) this process trains on.

    ``requested`` wins. Under a launcher (world size > 1 or LOCAL_RANK set) a rank uses one
    device: LOCAL_RANK when it names a visible device, else the current device. A single
    process uses the devices it has allocated memory on (a model spread with device_map), or
    else the current device."""
    import torch

    if requested is not None:
        return list(requested)
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    local = os.environ.get("LOCAL_RANK", "")
    if world_size > 1 or local.isdigit():
        return [int(local)] if local.isdigit() and int(local) < count else [torch.cuda.current_device()]
    used = [i for i in range(count) if torch.cuda.memory_reserved(i) > 0]
    return used or [torch.cuda.current_device()]


def nvml_selector(cuda_index: int) -> str:
    """How NVML finds a torch CUDA device: its UUID (NVML ignores CUDA_VISIBLE_DEVICES and may
    number devices differently), else its PCI bus id."""
    import torch

    props = torch.cuda.get_device_properties(cuda_index)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"


def open_gpus(nvml, selectors: list) -> tuple[list[NvmlDevice], str | None]:
    """NvmlDevice objects for NVML indices (int), UUIDs ('GPU-...', 'MIG-...') or PCI bus ids."""
    devices, problems = [], []
    for selector in selectors:
        try:
            if isinstance(selector, int):
                handle = nvml.nvmlDeviceGetHandleByIndex(selector)
            elif str(selector).startswith(("GPU-", "MIG-")):
                handle = nvml.nvmlDeviceGetHandleByUUID(selector)
            else:
                handle = nvml.nvmlDeviceGetHandleByPciBusId(selector)
            name = nvml.nvmlDeviceGetName(handle)
        except nvml.NVMLError as e:
            problems.append(f"device {selector}: {e}")
            continue
        devices.append(NvmlDevice(nvml, handle, name.decode() if isinstance(name, bytes) else str(name)))
    return devices, ("; ".join(problems) or None)


def _load_nvml():
    """pynvml (from nvidia-ml-py), initialised; (None, why) when it cannot be used."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install 'flopcount[energy]')"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"NVML could not start ({e})"
    return pynvml, None


def open_energy_meter(world_size: int = 1, *, devices: list[int] | None = None, enabled: bool = True,
                      nvml=None, rapl_root: str | None = None, local_rank: int | None = None) -> EnergyMeter:
    """The EnergyMeter of this process: its CUDA devices through NVML, and RAPL on local rank 0.

    ``nvml``: the pynvml module (or a stand-in with its functions); loaded when None and there
    are CUDA devices. Without CUDA the rank's device is its CPU. ``rapl_root`` defaults to
    $FLOPCOUNT_RAPL_ROOT, else /sys/class/powercap. ``enabled=False``: devices are recorded,
    energy is not read (every figure ``unavailable``)."""
    if local_rank is None:
        local = os.environ.get("LOCAL_RANK", "")
        local_rank = int(local) if local.isdigit() else 0
    rapl_root = rapl_root or os.environ.get("FLOPCOUNT_RAPL_ROOT") or RAPL_ROOT
    off = "energy metering switched off (meter(energy=False))"
    cpu = (RaplEnergy.open(rapl_root) if enabled else RaplEnergy([], off)) if local_rank == 0 else None
    indices = cuda_devices(world_size, devices)
    gpus, note = [], None if enabled else off
    if indices and enabled and nvml is None:
        nvml, note = _load_nvml()
    for index, name in zip(indices, _cuda_names(indices)):
        opened, problem = (open_gpus(nvml, [nvml_selector(index)]) if enabled and nvml is not None
                           else ([], note))
        # A GPU that NVML cannot read still counts as one of the rank's devices, without figures.
        gpus += opened or [_UnmeteredGpu(name, problem)]
    return EnergyMeter(gpus, cpu, cpu_name=cpu_model_name(), gpu_note=note)


def _cuda_names(indices: list[int]) -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in indices]


class _UnmeteredGpu(NvmlDevice):
    """A GPU the rank uses but NVML cannot read: it counts as a device, its energy is unavailable."""

    def __init__(self, name: str, reason: str | None = None) -> None:
        super().__init__(None, None, name)
        self.source, self.reason = UNAVAILABLE, reason or "NVML unavailable for this device"

    def start(self, now: float) -> None:
        pass


# ---- totals over step rows: time, hardware time, energy ---------------------------------------

# Columns of the trace's steps table that the tally reads (see trace/schema.py).
RESOURCE_COLUMNS = ["run_id", "rank", "start_time", "end_time", "training_flops", "device_name", "device_count",
                    "gpu_energy_j", "gpu_energy_source", "gpu_energy_devices", "cpu_energy_j", "cpu_energy_source"]
RATE_SAMPLE = 50_000  # per-step MFU: a uniform sample of at most this many step rows per device type


class _Sample:
    """A uniform sample without replacement of at most ``size`` values (bottom-k of random keys):
    every value while there are fewer, so small runs get exact quantiles; memory stays bounded."""

    def __init__(self, size: int = RATE_SAMPLE, seed: int = 0) -> None:
        import numpy as np

        self.size = size
        self.rng = np.random.default_rng(seed)
        self.values = np.empty(0)
        self.keys = np.empty(0)
        self.threshold = 1.0  # keys at or above it can no longer enter the bottom-k
        self.pending: list[float] = []

    def add(self, values) -> None:
        import numpy as np

        values = np.asarray(values, dtype=np.float64)
        keys = self.rng.random(values.size)
        if self.threshold < 1.0:
            values, keys = values[keys < self.threshold], keys[keys < self.threshold]
        if values.size == 0:
            return
        self.values = np.concatenate([self.values, values])
        self.keys = np.concatenate([self.keys, keys])
        if self.values.size > 2 * self.size:  # trim now and then, not on every batch
            self._trim()

    def _trim(self) -> None:
        import numpy as np

        if self.values.size > self.size:
            keep = np.argpartition(self.keys, self.size - 1)[:self.size]
            self.values, self.keys = self.values[keep], self.keys[keep]
            self.threshold = float(self.keys.max())

    def add_one(self, value: float) -> None:
        self.pending.append(value)
        if len(self.pending) >= 4096:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            self.add(pending)

    def tolist(self) -> list[float]:
        self.flush()
        self._trim()
        return self.values.tolist()


@dataclass
class _RankTime:
    active_s: float = 0.0
    device_name: str | None = None
    device_count: int | None = None
    first: float | None = None
    last: float | None = None


@dataclass
class ResourceTally:
    """Training time, device time and energy over step rows of any number of ranks and runs.

    Fed one row per step per rank by the live Meter (``add``), or record batches of a trace's
    ``steps`` table (``add_batch``, vectorised). Memory grows with ranks x runs, not with steps."""

    ranks: dict = field(default_factory=dict)                 # (run_id, rank) -> _RankTime
    device_seconds: defaultdict = field(default_factory=lambda: defaultdict(float))
    rates: dict = field(default_factory=dict)                 # device -> _Sample of FLOP/s per device
    rows: int = 0
    rows_without_devices: int = 0
    gpu_j: float = 0.0
    cpu_j: float = 0.0
    gpu_sources: Counter = field(default_factory=Counter)
    cpu_sources: Counter = field(default_factory=Counter)
    gpu_rows_missing: int = 0   # rows whose GPU figure is absent or covers fewer devices than used
    cpu_rows_missing: int = 0

    def _rank(self, run_id, rank, first, last, active_s, device_name, device_count) -> None:
        entry = self.ranks.setdefault((run_id, int(rank)), _RankTime())
        entry.active_s += active_s
        entry.first = first if entry.first is None else min(entry.first, first)
        entry.last = last if entry.last is None else max(entry.last, last)
        if device_name is not None and device_count:
            entry.device_name, entry.device_count = device_name, int(device_count)

    def _sample(self, device_name: str) -> _Sample:
        if device_name not in self.rates:
            self.rates[device_name] = _Sample(seed=len(self.rates))
        return self.rates[device_name]

    def add(self, run_id: str, rank: int, start: float, end: float, training_flops: int, *,
            device_name: str | None, device_count: int | None, gpu_j: float | None, gpu_source: str | None,
            gpu_devices: int | None, cpu_j: float | None, cpu_source: str | None) -> None:
        """One step row of one rank."""
        duration = max(end - start, 0.0)
        self._rank(run_id, rank, start, end, duration, device_name, device_count)
        self.rows += 1
        known = device_name is not None and bool(device_count)
        if not known:
            self.rows_without_devices += 1  # a trace written before the device columns existed
        else:
            self.device_seconds[device_name] += device_count * duration
            if duration > 0:
                self._sample(device_name).add_one(training_flops / (device_count * duration))
        gpu_source = gpu_source or UNAVAILABLE
        cpu_source = cpu_source or UNAVAILABLE
        self.gpu_sources[gpu_source] += 1
        self.cpu_sources[cpu_source] += 1
        if gpu_j is not None:
            self.gpu_j += gpu_j
        short = known and (gpu_devices or 0) < device_count
        if gpu_source != NO_DEVICE and (gpu_j is None or short):
            self.gpu_rows_missing += 1
        if cpu_j is not None:
            self.cpu_j += cpu_j
        elif cpu_source != RAPL_OTHER_RANK:
            self.cpu_rows_missing += 1

    def add_step(self, run_id: str, rank: int, record, energy: StepEnergy | None, meter: EnergyMeter | None) -> None:
        """One closed StepRecord of the live Meter."""
        self.add(run_id, rank, record.start_time, record.end_time, record.training_flops,
                 device_name=meter.device_name if meter else None, device_count=meter.device_count if meter else None,
                 gpu_j=energy.gpu_j if energy else None, gpu_source=energy.gpu_source if energy else None,
                 gpu_devices=energy.gpu_devices if energy else None, cpu_j=energy.cpu_j if energy else None,
                 cpu_source=energy.cpu_source if energy else None)

    def add_batch(self, batch) -> None:
        """A record batch of the steps table with ``RESOURCE_COLUMNS`` (absent columns as nulls):
        the same arithmetic as ``add``, vectorised (a batch is usually one rank of one run)."""
        import numpy as np
        import pyarrow.compute as pc

        n = batch.num_rows
        if n == 0:
            return
        column = batch.column

        def floats(name: str):  # nulls as NaN
            return column(name).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)

        def nulls(name: str):
            return column(name).is_null().to_numpy(zero_copy_only=False)

        def equal(name: str, value: str):
            return pc.fill_null(pc.equal(column(name), value), False).to_numpy(zero_copy_only=False)

        start = floats("start_time")
        duration = np.maximum(floats("end_time") - start, 0.0)
        count = np.nan_to_num(floats("device_count"))
        names = column("device_name")
        known = ~nulls("device_name") & (count > 0)
        runs, ranks = pc.unique(column("run_id")).to_pylist(), column("rank").to_numpy(zero_copy_only=False)
        if len(runs) == 1 and ranks.min() == ranks.max():
            last = np.flatnonzero(known)[-1] if known.any() else None
            self._rank(runs[0], int(ranks[0]), float(start.min()), float(floats("end_time").max()),
                       float(duration.sum()), names[int(last)].as_py() if last is not None else None,
                       int(count[last]) if last is not None else None)
        else:
            self._ranks_grouped(batch, duration)
        self.rows += n
        self.rows_without_devices += int(n - known.sum())
        device_s = count * duration
        rate_ok = known & (duration > 0)
        rates = np.divide(floats("training_flops"), device_s, out=np.zeros(n), where=rate_ok)
        device_names = (pc.unique(names if known.all() else pc.filter(names, known)).to_pylist()
                        if known.any() else [])
        for name in device_names:
            mask = known if len(device_names) == 1 else known & equal("device_name", name)
            self.device_seconds[name] += float(device_s[mask].sum())
            self._sample(name).add(rates[mask & rate_ok])
        def sources(name: str, counts: Counter, value: str):
            """Count the batch's sources; the rows whose source is ``value`` (a mask)."""
            found = {item["values"]: item["counts"]
                     for item in pc.value_counts(pc.fill_null(column(name), UNAVAILABLE)).to_pylist()}
            counts.update(found)
            if value not in found:
                return np.zeros(n, dtype=bool)
            return np.ones(n, dtype=bool) if len(found) == 1 else equal(name, value)

        no_gpu = sources("gpu_energy_source", self.gpu_sources, NO_DEVICE)
        other_rank = sources("cpu_energy_source", self.cpu_sources, RAPL_OTHER_RANK)
        gpu_j, cpu_j = floats("gpu_energy_j"), floats("cpu_energy_j")
        self.gpu_j += float(np.nansum(gpu_j))
        self.cpu_j += float(np.nansum(cpu_j))
        short = known & (np.nan_to_num(floats("gpu_energy_devices")) < count)
        gpu_missing = ~no_gpu & (np.isnan(gpu_j) | short)
        cpu_missing = np.isnan(cpu_j) & ~other_rank
        self.gpu_rows_missing += int(gpu_missing.sum())
        self.cpu_rows_missing += int(cpu_missing.sum())

    def _ranks_grouped(self, batch, duration) -> None:
        """Per-rank times of a batch that holds several ranks or runs."""
        import pyarrow as pa
        import pyarrow.compute as pc

        column = batch.column
        known = pc.and_(pc.is_valid(column("device_name")), pc.greater(pc.fill_null(column("device_count"), 0), 0))
        table = pa.table({"run_id": column("run_id"), "rank": column("rank"), "start": column("start_time"),
                          "end": column("end_time"), "duration": duration,
                          "name": pc.if_else(known, column("device_name"), pa.scalar(None, pa.string())),
                          "count": column("device_count")})
        grouped = table.group_by(["run_id", "rank"], use_threads=False).aggregate(
            [("start", "min"), ("end", "max"), ("duration", "sum"), ("name", "max"), ("count", "max")])
        for run_id, rank, first, last, active, name, count in zip(*(grouped.column(c).to_pylist() for c in (
                "run_id", "rank", "start_min", "end_max", "duration_sum", "name_max", "count_max"))):
            self._rank(run_id, rank, first, last, active, name, count)

    @property
    def step_rates(self) -> dict[str, list[float]]:
        """Device type -> achieved training FLOP/s per device of each sampled step row."""
        return {name: sample.tolist() for name, sample in self.rates.items()}

    # ---- results ------------------------------------------------------------------------
    def time_summary(self) -> dict:
        runs: dict[str, list] = defaultdict(list)
        for (run_id, _), entry in sorted(self.ranks.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            runs[run_id].append(entry)
        run_rows = []
        for run_id, entries in runs.items():
            start = min(e.first for e in entries)
            end = max(e.last for e in entries)
            devices: Counter = Counter()
            for e in entries:
                if e.device_name is not None:
                    devices[e.device_name] += e.device_count
            known = all(e.device_name is not None for e in entries)
            hardware_s = sum(e.active_s * e.device_count for e in entries) if known else None
            run_rows.append({"run_id": run_id, "ranks": len(entries), "start_time": start, "end_time": end,
                             "wall_clock_s": end - start, "hardware_s": hardware_s,
                             "hardware_days": hardware_s / SECONDS_PER_DAY if hardware_s is not None else None,
                             "devices": dict(devices)})
        wall = _union_length([(r["start_time"], r["end_time"]) for r in run_rows])
        hardware_s = (sum(r["hardware_s"] for r in run_rows)
                      if run_rows and all(r["hardware_s"] is not None for r in run_rows) else None)
        devices: dict[str, int] = {}
        for r in run_rows:  # the largest allocation of each device type in any one run
            for name, count in r["devices"].items():
                devices[name] = max(devices.get(name, 0), count)
        return {
            "wall_clock_s": wall, "wall_clock_days": wall / SECONDS_PER_DAY if wall is not None else None,
            "hardware_s": hardware_s,
            "hardware_days": hardware_s / SECONDS_PER_DAY if hardware_s is not None else None,
            "devices": devices, "device_count": sum(devices.values()) or None, "runs": run_rows,
            "source": ("wall clock: first step start to last step end of each run (union over runs); "
                       "hardware time: devices x step durations of every rank; devices from each rank's "
                       "environment (CUDA devices it trains on, else its CPU)")
                      if hardware_s is not None else
                      "wall clock from the step times; hardware time unavailable: the trace records no devices "
                      "(written before flopcount recorded them)",
        }

    def energy_summary(self) -> dict:
        gpu_measured = sum(n for s, n in self.gpu_sources.items() if s not in (UNAVAILABLE, NO_DEVICE))
        cpu_measured = self.cpu_sources.get(RAPL, 0)
        gpu_j = self.gpu_j if gpu_measured else None
        cpu_j = self.cpu_j if cpu_measured else None
        total = None if gpu_j is None and cpu_j is None else (gpu_j or 0.0) + (cpu_j or 0.0)
        uses_gpu = any(s != NO_DEVICE for s in self.gpu_sources)
        complete = self.rows > 0 and not self.gpu_rows_missing and not self.cpu_rows_missing
        return {
            "gpu_j": gpu_j, "gpu_sources": dict(self.gpu_sources), "gpu_rows_missing": self.gpu_rows_missing,
            "cpu_j": cpu_j, "cpu_sources": dict(self.cpu_sources), "cpu_rows_missing": self.cpu_rows_missing,
            "rows": self.rows, "total_j": total,
            "total_kwh": total / J_PER_KWH if total is not None else None,
            "total_mwh": total / J_PER_MWH if total is not None else None,
            "complete": complete,
            "coverage": _coverage_text(uses_gpu, gpu_j, cpu_j, complete),
        }


def _coverage_text(uses_gpu: bool, gpu_j, cpu_j, complete: bool) -> str:
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


def _union_length(intervals: list[tuple[float, float]]) -> float | None:
    """Total length covered by possibly overlapping intervals (runs that ran at the same time)."""
    if not intervals:
        return None
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    return total + (current_end - current_start)


def resources_summary(tally: ResourceTally, training_flops: int, *, dtype: str | None = None,
                      utilisation: float | None = None) -> dict:
    """The ``time``, ``energy`` and ``hardware_estimate`` entries of a summary."""
    from .hardware import ASSUMED_UTILISATION, DEFAULT_DTYPE, cross_check, quantiles

    rates = {name: quantiles(values) for name, values in tally.step_rates.items() if values}
    return {"time": tally.time_summary(), "energy": tally.energy_summary(),
            "hardware_estimate": cross_check(training_flops, dict(tally.device_seconds), rates,
                                             dtype=dtype or DEFAULT_DTYPE,
                                             utilisation=utilisation or ASSUMED_UTILISATION)}
