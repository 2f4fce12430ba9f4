"""Cumulative energy counters: NVML (per GPU) and RAPL (per CPU package and DRAM).

Each reader gives the joules of the interval between two ``read()`` calls, or None where there
is no figure (and says why in ``reason``). Counters that wrap are unwrapped with their range
(RAPL ``max_energy_range_uj``; NVML's is 2**64 mJ); a jump that would mean more than
``MAX_PLAUSIBLE_W`` is a counter reset, and that interval has no figure. A GPU without an energy
counter (NVML_ERROR_NOT_SUPPORTED: GPUs before Volta) falls back to power draw x time.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

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



class UnmeteredGpu(NvmlDevice):
    """A GPU the rank uses but NVML cannot read: it counts as a device, its energy is unavailable."""

    def __init__(self, name: str, reason: str | None = None) -> None:
        super().__init__(None, None, name)
        self.source, self.reason = UNAVAILABLE, reason or "NVML unavailable for this device"

    def start(self, now: float) -> None:
        pass

