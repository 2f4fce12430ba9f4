"""How a rank's devices and a step's energy become values of the trace's steps table, by column
name (the columns are defined once, in trace/schema.py)."""
from __future__ import annotations

from ..trace.schema import column_names
from .sampler import EnergyMeter, StepEnergy

# Columns of the trace's steps table that the tally reads: who and when, the training FLOPs,
# and the devices and energy.
RESOURCE_COLUMNS = column_names("steps", "run", "step", "devices", "energy")
RESOURCE_COLUMNS.insert(RESOURCE_COLUMNS.index("end_time") + 1, "training_flops")
# The energy columns that hold amounts (the rest say where they come from): a step split across
# several rows (accounting.StepRows) gives each row its share of them.
ENERGY_J_COLUMNS = ("gpu_energy_j", "cpu_energy_j")


def device_columns(meter: EnergyMeter | None) -> dict:
    """The rank's devices, the same in every step row: device_name, device_count (None without a meter)."""
    return {"device_name": meter.device_name if meter is not None else None,
            "device_count": meter.device_count if meter is not None else None}


def energy_columns(step: StepEnergy | None) -> dict:
    """A step's energy values with their sources (all None when the step's energy was not read)."""
    if step is None:
        return dict.fromkeys(column_names("steps", "energy"))
    return {"gpu_energy_j": step.gpu_j, "gpu_energy_source": step.gpu_source, "gpu_energy_devices": step.gpu_devices,
            "cpu_energy_j": step.cpu_j, "cpu_energy_source": step.cpu_source}
