"""One reading of one GPU from an NVML-like module, converted to base units.

The module is passed in (``pynvml`` in production, a test double in tests), so
this code never loads a driver by itself. A field the GPU does not support is
``None`` (ECC: 0); any other NVML error fails the whole GPU's reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ``pynvml`` or any object with the same functions, constants and error classes.
NvmlModule = Any


@dataclass(frozen=True)
class GpuSample:
    """What one poll read from one GPU; ``None`` marks a field it does not support."""

    index: int
    uuid: str
    name: str
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    memory_total_bytes: int | None
    power_watts: float | None
    temperature_celsius: float | None
    sm_clock_hertz: float | None
    ecc_uncorrected_errors: int


def unsupported_errors(nvml: NvmlModule) -> tuple[type[BaseException], ...]:
    """The NVML errors meaning "this GPU or driver lacks the field", not "the read failed"."""
    names = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound")
    return tuple(getattr(nvml, n) for n in names if hasattr(nvml, n))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read_gpu(nvml: NvmlModule, index: int) -> GpuSample:
    """Read GPU ``index``; raises ``nvml.NVMLError`` when the GPU cannot be read."""
    unsupported = unsupported_errors(nvml)
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def optional(read: Any, *args: Any) -> Any:
        try:
            return read(handle, *args)
        except unsupported:
            return None

    memory = optional(nvml.nvmlDeviceGetMemoryInfo)
    utilization = optional(nvml.nvmlDeviceGetUtilizationRates)
    power_mw = optional(nvml.nvmlDeviceGetPowerUsage)
    temperature = optional(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
    sm_clock_mhz = optional(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM)
    ecc = optional(nvml.nvmlDeviceGetTotalEccErrors,
                   nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
    return GpuSample(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        utilization_percent=None if utilization is None else float(utilization.gpu),
        memory_used_bytes=None if memory is None else int(memory.used),
        memory_free_bytes=None if memory is None else int(memory.free),
        memory_total_bytes=None if memory is None else int(memory.total),
        power_watts=None if power_mw is None else power_mw / 1000.0,
        temperature_celsius=None if temperature is None else float(temperature),
        sm_clock_hertz=None if sm_clock_mhz is None else sm_clock_mhz * 1e6,
        ecc_uncorrected_errors=int(ecc or 0),
    )
