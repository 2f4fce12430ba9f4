"""Devices, energy and time of a run (AI Act Annex XI; the Code of Practice form), by concern:

- ``rank``: who this process is (rank, world size, local rank, job id) from the launcher's
  environment -- the one source; ``flopcount.distributed`` adds torch.distributed on top;
- ``counters``: the cumulative energy counters, NVML per GPU and RAPL per CPU package / DRAM;
- ``devices``: which devices a rank trains on (CUDA devices as torch numbers them, else its CPU);
- ``sampler``: one rank's ``EnergyMeter``, read at every step boundary (RAPL on local rank 0 only:
  a CPU package is shared by the ranks of its host, so summing ranks never counts it twice);
- ``rows``: a rank's devices and a step's energy as values of the trace's steps table, by column name;
- ``tally``: time, device time, energy and per-step FLOP/s over step rows of any ranks and runs;
- ``prose``: the sentences a summary says about what its figures cover.

Every figure comes with its source; where there is none, the figure is None (null in the trace)
and the source ``unavailable`` -- never an invented number (docs/energy.md). Nothing here imports
torch at module level: the analysis side reads traces with this package and no PyTorch.
"""
from .counters import (CPU_DEVICE_KIND, MAX_PLAUSIBLE_W, MEASURED_SOURCES, MIN_PLAUSIBILITY_WINDOW_S, NO_DEVICE,
                       NVML_COUNTER, NVML_POWER, RAPL, RAPL_OTHER_RANK, RAPL_ROOT, UNAVAILABLE, CumulativeCounter,
                       NvmlDevice, RaplEnergy, RaplZone, UnmeteredGpu, counter_delta, rapl_zones)
from .devices import cpu_model_name, cuda_devices, cuda_names, load_nvml, nvml_selector, open_gpus
from .rank import env_rank_and_world_size, job_id, local_rank
from .rows import RESOURCE_COLUMNS, device_columns, energy_columns
from .sampler import EnergyMeter, StepEnergy, open_energy_meter
from .tally import J_PER_KWH, J_PER_MWH, RATE_SAMPLE, SECONDS_PER_DAY, ResourceTally, resources_summary

__all__ = [
    "CPU_DEVICE_KIND", "MAX_PLAUSIBLE_W", "MEASURED_SOURCES", "MIN_PLAUSIBILITY_WINDOW_S", "NO_DEVICE",
    "NVML_COUNTER", "NVML_POWER", "RAPL", "RAPL_OTHER_RANK", "RAPL_ROOT", "UNAVAILABLE", "CumulativeCounter",
    "NvmlDevice", "RaplEnergy", "RaplZone", "UnmeteredGpu", "counter_delta", "rapl_zones",
    "cpu_model_name", "cuda_devices", "cuda_names", "load_nvml", "nvml_selector", "open_gpus",
    "env_rank_and_world_size", "job_id", "local_rank", "RESOURCE_COLUMNS", "device_columns",
    "energy_columns",
    "EnergyMeter", "StepEnergy", "open_energy_meter",
    "J_PER_KWH", "J_PER_MWH", "RATE_SAMPLE", "SECONDS_PER_DAY", "ResourceTally", "resources_summary",
]
