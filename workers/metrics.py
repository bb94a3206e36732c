"""The worker's own Prometheus metrics, served with vLLM's on ``WORKER_METRICS_PORT``.

vLLM registers its ``vllm:*`` engine metrics in the same default registry, so
one scrape of a worker shows both the queue side and the engine side.
"""

from __future__ import annotations

import sys
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

PRIORITY_NAMES = {0: "interactive", 1: "batch"}

ACTIVE_JOBS = Gauge("inferq_worker_active_jobs", "Jobs this worker is generating right now.", ["priority"])
SLOTS = Gauge("inferq_worker_slots", "Sequences this worker's engine runs at once (MAX_NUM_SEQS).")
BATCH_SLOTS = Gauge("inferq_worker_batch_slots", "Of those, how many batch work may hold (BATCH_SHARE).")
JOBS = Counter("inferq_worker_jobs", "Jobs this worker took, by how they ended "
               "(refused: cancelled or finished before it started).", ["priority", "outcome"])
PUBLISH_SECONDS = Histogram(
    "inferq_worker_publish_seconds",
    "Time of one round trip publishing deltas to Redis (every job's deltas that were ready together).",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
QUEUE_WAIT = Histogram(
    "inferq_queue_wait_seconds", "Time a job waited in its queue, from enqueue to the start of its run.",
    ["priority"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800))

for _priority in PRIORITY_NAMES.values():  # export zeros before the first job
    ACTIVE_JOBS.labels(_priority)
    for _outcome in ("succeeded", "failed", "cancelled", "refused"):
        JOBS.labels(_priority, _outcome)


class _QuietHandler(WSGIRequestHandler):
    timeout = 10  # seconds a connection may stay silent (a scrape takes ms): no slow client keeps a thread


class _Server(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], TimeoutError):  # a silent client cut off: nothing to report
            super().handle_error(request, client_address)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's signature
        pass


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve the default registry (inferq's and vLLM's metrics) on a daemon thread.

    Always in the classic text format: prometheus_client 0.26 answers Prometheus'
    OpenMetrics ``Accept`` header with vLLM's ``vllm:*`` samples renamed ``vllm_*``
    while their HELP/TYPE lines keep the colon (prometheus/client_python#1177).
    """
    app = make_wsgi_app()

    def classic_text(environ: dict[str, Any], start_response: Any) -> Any:
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    server = make_server(host, port, classic_text, _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
