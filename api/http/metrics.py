"""The API's Prometheus metrics at ``/metrics``.

prometheus-flask-exporter times every request (``flask_http_request_*``);
inferq adds what the client of a model sees (latency, time to first token),
tokens, refusals, and two gauges read from Redis at scrape time: queue depth
per queue and live workers per model.

Under gunicorn (``inferq api``) ``PROMETHEUS_MULTIPROC_DIR`` is set and every
worker process writes its samples there; whichever process answers a scrape
sums them all. Labels are bounded: routes, models served, reasons and status
codes, never a key or a job id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import redis
from flask import Flask, Request, Response, request
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

from config import Settings
from queueing import keys, liveness

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)

REQUEST_DURATION = Histogram(
    "inferq_request_duration_seconds",
    "End-to-end time of a generation request as its client sees it (successful ones).",
    ["endpoint", "stream"], buckets=LATENCY_BUCKETS, registry=None)
TTFT = Histogram(
    "inferq_ttft_seconds", "Time from a generation request's arrival to its first token.",
    ["endpoint"], buckets=TTFT_BUCKETS, registry=None)
TOKENS = Counter(
    "inferq_tokens", "Tokens settled (every job: streams, jobs and batch lines), by model.",
    ["model", "kind"], registry=None)
AUTH_FAILURES = Counter(
    "inferq_auth_failures", "Requests refused for a missing or invalid API key.", ["reason"], registry=None)
REJECTIONS = Counter(
    "inferq_rejections",
    "Requests refused before they ran: rate_limit, token_limit, ip_limit, quota, queue_full, no_worker, "
    "key_streams, key_queued.",
    ["reason"], registry=None)
LEDGER_DEAD_LETTERS = Counter(
    "inferq_ledger_dead_letters",
    "Usage entries set aside in the ledger's dead letter, by stage: invalid (malformed or over a "
    "column's limit), sql (the database refused it), collect (the batch collector could not record a "
    "finished batch line).",
    ["stage"], registry=None)

STREAM_RELAY = Counter(
    "inferq_stream_relay",
    "Streams whose tokens went from the pub/sub reader straight to the client's socket (relayed), and "
    "times a client's socket was full, so that its stream's own greenlet wrote the rest (stalled).",
    ["event"], registry=None)

DEAD_LETTER_STAGES = ("invalid", "sql", "collect")
OWN_METRICS = (REQUEST_DURATION, TTFT, TOKENS, AUTH_FAILURES, REJECTIONS, LEDGER_DEAD_LETTERS, STREAM_RELAY)


class QueueCollector(Collector):
    """Queue depth per Celery queue and live workers per model, read from Redis per scrape."""

    def __init__(self, client: redis.Redis, served_model: str):
        self.redis = client
        self.served_model = served_model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("inferq_queue_depth", "Jobs waiting in a queue (Redis list length).",
                                  labels=["queue"])
        workers = GaugeMetricFamily("inferq_live_workers", "Workers with a fresh heartbeat, per model.",
                                    labels=["model"])
        try:
            live = liveness.live_models(self.redis)
            models = sorted({self.served_model, *live})
            queues = [q for m in models for q in (keys.model_queue(m), keys.batch_queue(m))]
            pipe = self.redis.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
            lengths = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable for queue gauges (%s)", exc)
            return
        for queue, length in zip(queues, lengths, strict=True):
            depth.add_metric([queue], int(length))
        for model in models:
            workers.add_metric([model], live.get(model, 0))
        yield depth
        yield workers


def path(request: Request) -> str:
    """The ``path`` label: the matched route (``/v1/jobs/<job_id>``), never the raw path."""
    return request.url_rule.rule if request.url_rule else "<unmatched>"


def init_app(app: Flask, settings: Settings, client: redis.Redis) -> PrometheusMetrics:
    """Serve ``/metrics`` on ``app``: multiprocess under gunicorn, else this process only."""
    queues = QueueCollector(client, settings.served_model_name)
    registry = CollectorRegistry()
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    options = {"group_by": path, "excluded_paths": ["^/metrics$"], "registry": registry}
    if multiprocess:
        # This class registers no endpoint of its own: the view below adds the Redis gauges,
        # which the exporter's multiprocess endpoint would leave out.
        metrics: PrometheusMetrics = GunicornPrometheusMetrics(app, **options)
    else:
        metrics = PrometheusMetrics(app, path=None, **options)
        for metric in OWN_METRICS:
            registry.register(metric)
        registry.register(queues)
    metrics.info("inferq_api_info", "The served model of this API.", model=settings.served_model_name)
    _zero_dead_letters()

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        if multiprocess:  # every process's samples, summed from PROMETHEUS_MULTIPROC_DIR
            scrape = CollectorRegistry()
            MultiProcessCollector(scrape)
            scrape.register(queues)
        else:
            scrape = registry
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(scrape), content_type=content_type)

    return metrics


def _zero_dead_letters() -> None:
    for stage in DEAD_LETTER_STAGES:  # at 0 from the start, so an alert on increase() has data
        LEDGER_DEAD_LETTERS.labels(stage)


def serve_coordinator_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve the coordinator's own metrics (settled tokens, dead letters) on a daemon thread."""
    registry = CollectorRegistry()
    for metric in (TOKENS, LEDGER_DEAD_LETTERS):
        registry.register(metric)
    _zero_dead_letters()
    start_http_server(port, host, registry=registry)
