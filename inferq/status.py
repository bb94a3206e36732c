"""``inferq status``: what a deployment is doing right now, on one screen or as JSON.

It reads only what the deployment already publishes, and needs no API key: the workers'
heartbeats, queue lengths and running jobs in Redis, batches in SQL, the GPUs of this host
through NVML, and whether the API and Flower answer. The report is a plain dict (the JSON
of ``--json``); :mod:`inferq.status_view` draws the screen. Exit status 1 when no worker
is live (or Redis cannot be reached).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import pynvml
import redis
import sqlalchemy as sa
from rich.console import Console

from config import Settings, get_settings
from gpu_monitor.nvml import NvmlModule, read_gpu
from inferq.status_view import render
from queueing import keys, liveness
from queueing.connections import master_address, redis_client

#: Batch statuses that have not ended (the API's ``api.batches.store.RUNNING``; status reads SQL without
#: the API).
BATCHES_IN_PROGRESS = ("validating", "in_progress", "finalizing", "cancelling")
_BATCHES = sa.table("batches", *(sa.column(name) for name in (
    "id", "model", "status", "total", "dispatched", "completed", "failed", "created_at")))
TIMEOUT = 2.0  # seconds for each probe: a status must come back even when parts hang


def redacted(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def redis_for_status(settings: Settings) -> redis.Redis:
    """The deployment's Redis as every inferq process finds it (``REDIS_URL``, or the primary
    the sentinels of ``REDIS_SENTINELS`` name, over TLS for ``rediss://``), failing within a few
    seconds (:data:`TIMEOUT`) rather than waiting out a whole failover: a status comes back
    even when Redis hangs."""
    client = redis_client(settings.model_copy(update={"redis_failover_timeout": TIMEOUT}))
    # A pool of status's own (no other client has this failover budget), so the reply timeout
    # stays here; no command of status blocks.
    client.connection_pool.connection_kwargs["socket_timeout"] = TIMEOUT
    return client


def location(settings: Settings, client: redis.Redis | None = None) -> str:
    """Where Redis is, for the report: ``REDIS_URL`` without its password, or the sentinels'
    primary (with its address once ``client`` found it)."""
    if not settings.sentinel_addresses:
        return redacted(settings.redis_url)
    sentinels = ",".join(f"{host}:{port}" for host, port in settings.sentinel_addresses)
    found = master_address(client) if client is not None else None
    at = f" at {found[0]}:{found[1]}" if found else ""
    return f"primary {settings.redis_sentinel_master}{at} (sentinels {sentinels})"


def redis_state(client: redis.Redis, url: str) -> dict[str, Any]:
    """Memory and clients, from INFO."""
    info = client.info("memory") | client.info("clients")
    return {"url": redacted(url), "reachable": True,
            "used_memory": info["used_memory"], "used_memory_human": info["used_memory_human"],
            "maxmemory": info.get("maxmemory", 0), "connected_clients": info["connected_clients"],
            "blocked_clients": info.get("blocked_clients", 0)}


def workers(client: redis.Redis) -> list[dict[str, Any]]:
    """Each live worker as its heartbeat describes it, with the jobs Redis says it runs."""
    running = client.hvals(keys.RUNNING_JOBS)
    found = []
    for worker in liveness.live_workers(client):
        info = worker.info
        in_use = None if "running" not in info else info["running"] + info.get("batch_running", 0)
        found.append({
            "id": worker.worker_id, "model": worker.model,
            "host": info.get("host", worker.worker_id.rsplit("-", 1)[0]), "pid": info.get("pid"),
            "engine": info.get("engine"), "devices": info.get("devices"),
            "slots_in_use": in_use, "slots": info.get("slots"),
            "batch_share": info.get("batch_share"), "batch_slots": info.get("batch_slots"),
            "batch_in_use": info.get("batch_running"),
            "jobs_running": running.count(keys.running_entry(worker.model, worker.worker_id)),
        })
    return sorted(found, key=lambda w: (w["model"], w["host"], w["id"]))


def queues(client: redis.Redis, models: set[str]) -> list[dict[str, Any]]:
    """Messages waiting in each model's interactive and batch queue (Celery's Redis lists)."""
    names = sorted(models)
    pipe = client.pipeline(transaction=False)
    for model in names:
        pipe.llen(keys.model_queue(model))
        pipe.llen(keys.batch_queue(model))
    depths = pipe.execute()
    return [{"model": model, "interactive": int(depths[2 * i]), "batch": int(depths[2 * i + 1])}
            for i, model in enumerate(names)]


def coordinators(client: redis.Redis) -> dict[str, Any]:
    """Live coordinators (each beats about once a second) and the entries waiting in the usage and
    batch-lines streams."""
    live = client.zrangebyscore(keys.COORDINATORS, time.time(), "+inf")
    return {"live": sorted(str(name) for name in live),
            "usage_backlog": int(client.xlen(keys.USAGE_STREAM)),
            "batch_lines_backlog": int(client.xlen(keys.BATCH_LINES_STREAM))}


def known_models(client: redis.Redis, settings: Settings, live: list[dict[str, Any]]) -> set[str]:
    """The default model, the live workers' models, and every model a worker has served here."""
    return {settings.served_model_name, *(w["model"] for w in live), *client.hkeys(keys.MODEL_CARDS)}


def batches(settings: Settings) -> dict[str, Any]:
    """Batches in progress with their line counts, from SQL (never creating a database)."""
    path = settings.sqlite_path
    if path is not None and not path.exists():
        return {"readable": False, "message": f"no database yet at {path}", "in_progress": []}
    engine = sa.create_engine(settings.database_url, connect_args={"connect_timeout": int(TIMEOUT)}
                              if settings.database_url.startswith("postgres") else {})
    query = sa.select(_BATCHES).where(_BATCHES.c.status.in_(BATCHES_IN_PROGRESS)).order_by(
        _BATCHES.c.created_at)
    try:
        with engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
    except sa.exc.SQLAlchemyError as exc:
        return {"readable": False, "message": f"batches unreadable ({type(exc).__name__})", "in_progress": []}
    finally:
        engine.dispose()
    return {"readable": True, "in_progress": rows}


def gpus(nvml: NvmlModule = pynvml) -> dict[str, Any]:
    """Each GPU of this host read through NVML, or why there is none."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return {"available": False, "message": f"no GPU: NVML found no NVIDIA driver/GPU here ({exc})",
                "devices": []}
    try:
        devices = [asdict(read_gpu(nvml, i)) for i in range(int(nvml.nvmlDeviceGetCount()))]
    except nvml.NVMLError as exc:
        return {"available": False, "message": f"GPUs unreadable: {exc}", "devices": []}
    finally:
        nvml.nvmlShutdown()
    if not devices:
        return {"available": False, "message": "no GPU: the NVIDIA driver lists none", "devices": []}
    return {"available": True, "devices": devices}


def endpoint(name: str, base: str, path: str) -> dict[str, Any]:
    """Whether ``base + path`` answers (any HTTP status counts as answering)."""
    try:
        code: int | None = httpx.get(base + path, timeout=TIMEOUT).status_code
    except httpx.HTTPError:
        code = None
    return {"name": name, "url": base, "answers": code is not None, "status": code}


def local_url(host: str, port: int) -> str:
    """An address for this host's service listening on ``host``."""
    return f"http://{'127.0.0.1' if host in ('', '0.0.0.0', '::') else host}:{port}"


def collect(settings: Settings, api_url: str, flower_url: str) -> dict[str, Any]:
    """The whole report (JSON-ready)."""
    api, ready = endpoint("api", api_url, "/health"), endpoint("api-ready", api_url, "/ready")
    api["ready"] = ready["status"]
    report: dict[str, Any] = {
        "workers": [], "coordinators": None, "queues": [], "jobs": None, "batches": batches(settings),
        "gpus": gpus(),
        "endpoints": [api, endpoint("flower", flower_url, "/healthcheck")],
    }
    client = redis_for_status(settings)
    try:
        report["redis"] = redis_state(client, location(settings, client))
        report["workers"] = workers(client)
        report["coordinators"] = coordinators(client)
        report["queues"] = queues(client, known_models(client, settings, report["workers"]))
        report["jobs"] = {"running": int(client.hlen(keys.RUNNING_JOBS)),
                          "queued": sum(q["interactive"] + q["batch"] for q in report["queues"])}
    except redis.RedisError as exc:
        report["redis"] = {"url": location(settings), "reachable": False, "error": str(exc)}
    finally:
        client.close()
    return report


def problem(report: dict[str, Any]) -> str | None:
    """Why the exit status is non-zero, or None."""
    if not report["redis"]["reachable"]:
        return f"Redis at {report['redis']['url']} is unreachable: no worker can be seen"
    if not report["workers"]:
        return "no live worker: start one (`inferq worker`, or the whole stack with `inferq run`)"
    return None


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead.")
@click.option("--api-url", help="The API's base URL (default: this host's API_PORT).")
@click.option("--flower-url", help="Flower's base URL (default: this host's FLOWER_PORT).")
def status(as_json: bool, api_url: str | None, flower_url: str | None) -> None:
    """Workers, queues, jobs, batches, GPUs, Redis and endpoints, on one screen (no API key).

    Exit status 1 when no worker is live.
    """
    s = get_settings()
    report = collect(s, (api_url or local_url(s.api_host, s.api_port)).rstrip("/"),
                     (flower_url or local_url("", s.flower_port)).rstrip("/"))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render(report, Console())
    why = problem(report)
    if why is not None:
        Console(stderr=True).print(f"[red]{why}[/]", highlight=False, soft_wrap=True)
        sys.exit(1)
