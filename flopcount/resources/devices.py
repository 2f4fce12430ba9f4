"""Which devices a rank trains on: its CUDA devices (as torch numbers them) and how NVML finds
them, else its CPU. torch and pynvml are imported inside the functions: the analysis side
(summaries, reports) imports this package without either."""
from __future__ import annotations

import platform

from .counters import NvmlDevice
from .rank import local_rank


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cuda_devices(world_size: int, requested: list[int] | None = None) -> list[int]:
    """The CUDA device indices (as torch numbers them) this process trains on.

    ``requested`` wins. Under a launcher (world size > 1 or a local rank set) a rank uses one
    device: its local rank when that names a visible device, else the current device. A single
    process uses the devices it has allocated memory on (a model spread with device_map), or
    else the current device."""
    import torch

    if requested is not None:
        return list(requested)
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    local = local_rank()
    if world_size > 1 or local is not None:
        return [local] if local is not None and local < count else [torch.cuda.current_device()]
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


def load_nvml():
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



def cuda_names(indices: list[int]) -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in indices]

