"""Worker heartbeats in Redis: which models have a live worker right now.

Each worker refreshes its entry every few seconds with an expiry score (and
trims entries that expired); readers only read, counting unexpired entries.
Asking Redis is one round trip, unlike a Celery broadcast. A worker may also
describe itself (host, pid, slots, jobs running...) in a record that expires
with its heartbeat, for ``inferq status``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from queueing import keys

_SEP = "\t"


@dataclass(frozen=True)
class LiveWorker:
    """A worker with an unexpired heartbeat, and what it said about itself (empty if nothing)."""

    model: str
    worker_id: str
    info: dict[str, Any]


def beat(client: redis.Redis, model: str, worker_id: str, ttl: float, model_cards: str | None = None,
         info: dict[str, Any] | None = None) -> None:
    """Record that ``worker_id`` serves ``model`` for the next ``ttl`` seconds (and the
    model's cards, a JSON list, for ``/v1/models``; and ``info``, the worker's description)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.LIVE_WORKERS, "-inf", now)
    pipe.zadd(keys.LIVE_WORKERS, {f"{model}{_SEP}{worker_id}": now + ttl})
    if model_cards is not None:
        pipe.hset(keys.MODEL_CARDS, model, model_cards)
    if info is not None:
        pipe.set(keys.worker_info(model, worker_id), json.dumps(info, separators=(",", ":")),
                 px=max(1, int(ttl * 1000)))
    pipe.execute()


def model_cards(client: redis.Redis, models: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The model cards the live workers of ``models`` published (models without any are left out)."""
    if not models:
        return {}
    found = client.hmget(keys.MODEL_CARDS, models)
    return {model: json.loads(raw) for model, raw in zip(models, found, strict=True) if raw}


def retire(client: redis.Redis, model: str, worker_id: str) -> None:
    """Remove a worker's entry (clean shutdown)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(keys.LIVE_WORKERS, f"{model}{_SEP}{worker_id}")
    pipe.delete(keys.worker_info(model, worker_id))
    pipe.execute()


def live_workers(client: redis.Redis) -> list[LiveWorker]:
    """Every live worker with its description (workers that send none have an empty ``info``)."""
    pairs: list[tuple[str, str]] = []
    for raw in client.zrangebyscore(keys.LIVE_WORKERS, time.time(), "+inf"):
        model, sep, worker = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(_SEP)
        if sep:
            pairs.append((model, worker))
    found = client.mget([keys.worker_info(model, worker) for model, worker in pairs]) if pairs else []
    return [LiveWorker(model, worker, json.loads(raw) if raw else {})
            for (model, worker), raw in zip(pairs, found, strict=True)]


def query_live(pipe: redis.client.Pipeline) -> None:
    """Queue the read of live entries on ``pipe`` (parse its reply with :func:`count_models`)."""
    pipe.zrangebyscore(keys.LIVE_WORKERS, time.time(), "+inf")


def count_models(members: list[str]) -> Counter[str]:
    """Served model name -> number of live workers, from :func:`query_live`'s reply."""
    return Counter(member.split(_SEP, 1)[0] for member in members)


def live_models(client: redis.Redis) -> Counter[str]:
    """Served model name -> number of live workers."""
    pipe = client.pipeline(transaction=False)
    query_live(pipe)
    return count_models(pipe.execute()[0])


def is_alive(client: redis.Redis, model: str, worker_id: str) -> bool:
    """True while ``worker_id``'s heartbeat for ``model`` has not expired."""
    score = client.zscore(keys.LIVE_WORKERS, f"{model}{_SEP}{worker_id}")
    return score is not None and float(score) > time.time()
