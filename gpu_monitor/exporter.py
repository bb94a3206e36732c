"""The ``inferq_gpu_*`` metrics and the HTTP server for ``/metrics`` and ``/health``.

The HTTP side only reads the poller's last snapshot, so a scrape never waits on
NVML. Metric names are a contract with the Grafana dashboard and alert rules.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpu_monitor.nvml import GpuSample
from gpu_monitor.poller import GpuPoller, Snapshot

logger = logging.getLogger(__name__)

LABELS = ["gpu", "uuid", "name"]

# (metric name, help text, GpuSample field): one labelled gauge per GPU field.
GPU_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("inferq_gpu_utilization_percent", "GPU utilization over the last sample period (0-100).",
     "utilization_percent"),
    ("inferq_gpu_memory_used_bytes", "GPU memory in use, bytes.", "memory_used_bytes"),
    ("inferq_gpu_memory_free_bytes", "GPU memory free, bytes.", "memory_free_bytes"),
    ("inferq_gpu_memory_total_bytes", "GPU memory installed, bytes.", "memory_total_bytes"),
    ("inferq_gpu_power_watts", "GPU power draw, watts.", "power_watts"),
    ("inferq_gpu_temperature_celsius", "GPU core temperature, degrees Celsius.", "temperature_celsius"),
    ("inferq_gpu_sm_clock_hertz", "GPU SM clock, hertz.", "sm_clock_hertz"),
    ("inferq_gpu_ecc_uncorrected_errors",
     "Volatile uncorrected ECC errors since the last driver load (0 where ECC is unsupported).",
     "ecc_uncorrected_errors"),
)


class GpuCollector(Collector):
    """Turns the poller's last snapshot into Prometheus metric families."""

    def __init__(self, poller: GpuPoller):
        self.poller = poller

    def collect(self) -> Iterable[Metric]:
        """The ``inferq_gpu_*`` families of the last snapshot."""
        snap = self.poller.snapshot
        yield GaugeMetricFamily("inferq_gpu_up",
                                "1 when NVML is initialised and the last poll listed the GPUs, else 0.",
                                value=1 if snap.up else 0)
        yield GaugeMetricFamily("inferq_gpu_count", "GPUs NVML reports on this host.", value=snap.count)
        yield CounterMetricFamily("inferq_gpu_poll_errors",
                                  "Failed NVML reads (device list or one GPU) since the exporter started.",
                                  value=snap.poll_errors)
        yield from gpu_families(snap.gpus)


def gpu_families(gpus: Iterable[GpuSample]) -> Iterator[GaugeMetricFamily]:
    """One labelled gauge family per GPU field; a GPU without that field has no sample."""
    for name, help_text, field in GPU_GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=LABELS)
        for gpu in gpus:
            value = getattr(gpu, field)
            if value is not None:
                family.add_metric([str(gpu.index), gpu.uuid, gpu.name], value)
        yield family


def health_body(snap: Snapshot) -> bytes:
    """The /health JSON: the process answers, with whether NVML works and how many GPUs."""
    return json.dumps({"status": "ok", "nvml": snap.up, "gpus": snap.count}).encode()


WsgiApp = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]


def make_app(poller: GpuPoller, registry: CollectorRegistry) -> WsgiApp:
    """A WSGI app routing /metrics to prometheus_client and /health to ``health_body``."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/health":
            body = health_body(poller.snapshot)
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /health\n"]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket],
                     client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], TimeoutError):  # a silent client cut off: nothing to report
            super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # seconds a connection may stay silent (a scrape takes ms): no slow client keeps a thread

    def log_message(self, format: str, *args: object) -> None:
        logger.debug(format, *args)


class GpuExporter:
    """The poller, its collector in a dedicated registry, and the HTTP server on ``host:port``."""

    def __init__(self, poller: GpuPoller, host: str, port: int):
        self.poller = poller
        self.registry = CollectorRegistry()
        self.registry.register(GpuCollector(poller))
        self.server = make_server(host, port, make_app(poller, self.registry),
                                  server_class=_ThreadingServer, handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when asked for port 0)."""
        return int(self.server.server_address[1])

    def serve_forever(self) -> None:
        """Start polling and serve HTTP in this thread until shut down."""
        self.poller.start()
        self.server.serve_forever()

    def start(self) -> None:
        """Start polling and serving in background threads."""
        self._thread = threading.Thread(target=self.serve_forever, name="gpu-monitor-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and polling, and release NVML."""
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()
        self.poller.stop()
