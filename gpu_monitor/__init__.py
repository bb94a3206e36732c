"""A Prometheus exporter of NVIDIA GPU metrics read through NVML (``pynvml``).

``nvml`` reads one sample per GPU from an NVML-like module, ``poller`` keeps the
last snapshot fresh from a background thread (and survives a missing driver),
``exporter`` turns the snapshot into ``inferq_gpu_*`` metrics served on
``/metrics`` next to ``/health``, and ``cli`` is ``inferq gpu-monitor``.
This package depends on ``config`` only.
"""

from gpu_monitor.exporter import GpuCollector, GpuExporter
from gpu_monitor.nvml import GpuSample, read_gpu
from gpu_monitor.poller import GpuPoller, Snapshot

__all__ = ["GpuCollector", "GpuExporter", "GpuPoller", "GpuSample", "Snapshot", "read_gpu"]
