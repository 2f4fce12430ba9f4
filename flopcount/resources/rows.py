"""How a step's devices and energy become values of the trace's steps table (trace/schema.py)."""
from __future__ import annotations

from .sampler import EnergyMeter, StepEnergy

# Columns of the trace's steps table that the tally reads (see trace/schema.py).
RESOURCE_COLUMNS = ["run_id", "rank", "start_time", "end_time", "training_flops", "device_name", "device_count",
                    "gpu_energy_j", "gpu_energy_source", "gpu_energy_devices", "cpu_energy_j", "cpu_energy_source",
                    "trailing"]


def energy_row(step: StepEnergy | None, meter: EnergyMeter | None) -> tuple:
    """A step's device and energy values for the trace's steps table, in schema order
    (device_name, device_count, gpu_energy_j, gpu_energy_source, gpu_energy_devices, cpu_energy_j,
    cpu_energy_source)."""
    device = (meter.device_name, meter.device_count) if meter is not None else (None, None)
    if step is None:
        return (*device, None, None, None, None, None)
    return (*device, step.gpu_j, step.gpu_source, step.gpu_devices, step.cpu_j, step.cpu_source)
