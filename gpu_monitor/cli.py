"""``inferq gpu-monitor``: run the GPU exporter in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click
import pynvml

from config import get_settings
from gpu_monitor.exporter import GpuExporter
from gpu_monitor.poller import GpuPoller

logger = logging.getLogger(__name__)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # Raised in the main thread, which only runs the accept loop: serve_forever
    # unwinds and the `finally` below stops polling and releases NVML.
    sys.exit(0)


@click.command("gpu-monitor", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=None, help="Port (default GPU_MONITOR_PORT, 9101).")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds between NVML polls (default GPU_MONITOR_INTERVAL, 5).")
def gpu_monitor(host: str, port: int | None, interval: float | None) -> None:
    """Export NVIDIA GPU metrics (read with NVML/pynvml) for Prometheus.

    Serves /metrics (Prometheus text) and /health (JSON: status, nvml, gpus).
    Per GPU, labelled gpu (index), uuid and name:

    \b
      inferq_gpu_utilization_percent
      inferq_gpu_memory_used_bytes, _free_bytes, _total_bytes
      inferq_gpu_power_watts
      inferq_gpu_temperature_celsius
      inferq_gpu_sm_clock_hertz
      inferq_gpu_ecc_uncorrected_errors  (volatile; 0 where ECC is unsupported)

    \b
    and for the host:
      inferq_gpu_up                (1 when NVML works and the last poll listed the GPUs)
      inferq_gpu_count
      inferq_gpu_poll_errors_total

    Without a driver or GPU it keeps serving inferq_gpu_up 0 and retries NVML
    every interval, so a driver that appears later is picked up.
    """
    settings = get_settings()
    logging.basicConfig(level=settings.log_level)
    poller = GpuPoller(pynvml, interval or settings.gpu_monitor_interval)
    exporter = GpuExporter(poller, host, settings.gpu_monitor_port if port is None else port)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    logger.info("GPU monitor on http://%s:%d/metrics (polling every %gs)",
                host, exporter.port, poller.interval)
    try:
        exporter.serve_forever()
    finally:
        exporter.close()
        logger.info("GPU monitor stopped")
