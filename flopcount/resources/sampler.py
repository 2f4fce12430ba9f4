"""One rank's energy meter: its GPUs' counters and (on local rank 0 only) its host's RAPL
counters, read at each step boundary (no background thread: a cumulative counter read at the
boundaries gives each step's energy whatever happened in between)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .counters import (CPU_DEVICE_KIND, NO_DEVICE, RAPL, RAPL_OTHER_RANK, RAPL_ROOT, UNAVAILABLE, NvmlDevice,
                       RaplEnergy, UnmeteredGpu)
from .devices import cuda_names, load_nvml, cpu_model_name, cuda_devices, nvml_selector, open_gpus
from .rank import local_rank as _local_rank


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


def open_energy_meter(world_size: int = 1, *, devices: list[int] | None = None, enabled: bool = True,
                      nvml=None, rapl_root: str | None = None, local_rank: int | None = None) -> EnergyMeter:
    """The EnergyMeter of this process: its CUDA devices through NVML, and RAPL on local rank 0.

    ``nvml``: the pynvml module (or a stand-in with its functions); loaded when None and there
    are CUDA devices. Without CUDA the rank's device is its CPU. ``rapl_root`` defaults to
    $FLOPCOUNT_RAPL_ROOT, else /sys/class/powercap. ``enabled=False``: devices are recorded,
    energy is not read (every figure ``unavailable``). ``local_rank``: default from the launcher's
    environment (resources/rank.py: torchrun, SLURM, Open MPI, MPICH), 0 outside a launcher; only
    local rank 0 reads the host's CPU counters, so that summing ranks counts each package once."""
    if local_rank is None:
        local_rank = _local_rank() or 0
    rapl_root = rapl_root or os.environ.get("FLOPCOUNT_RAPL_ROOT") or RAPL_ROOT
    off = "energy metering switched off (meter(energy=False))"
    cpu = (RaplEnergy.open(rapl_root) if enabled else RaplEnergy([], off)) if local_rank == 0 else None
    indices = cuda_devices(world_size, devices)
    gpus, note = [], None if enabled else off
    if indices and enabled and nvml is None:
        nvml, note = load_nvml()
    for index, name in zip(indices, cuda_names(indices)):
        opened, problem = (open_gpus(nvml, [nvml_selector(index)]) if enabled and nvml is not None
                           else ([], note))
        # A GPU that NVML cannot read still counts as one of the rank's devices, without figures.
        gpus += opened or [UnmeteredGpu(name, problem)]
    return EnergyMeter(gpus, cpu, cpu_name=cpu_model_name(), gpu_note=note)

