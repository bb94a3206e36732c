"""Worker heartbeats in Redis: which models have a live worker right now.

Each worker refreshes its entry every few seconds with an expiry score (and
trims entries that expired); readers only read, counting unexpired entries.
Asking Redis is one round trip, unlike a Celery broadcast.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import redis

from queueing import keys

_SEP = "\t"


def beat(client: redis.Redis, model: str, worker_id: str, ttl: float, model_cards: str | None = None) -> None:
    """Record that ``worker_id`` serves ``model`` for the next ``ttl`` seconds (and the
    model's cards, a JSON list, for ``/v1/models``)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.LIVE_WORKERS, "-inf", now)
    pipe.zadd(keys.LIVE_WORKERS, {f"{model}{_SEP}{worker_id}": now + ttl})
    if model_cards is not None:
        pipe.hset(keys.MODEL_CARDS, model, model_cards)
    pipe.execute()


def model_cards(client: redis.Redis, models: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The model cards the live workers of ``models`` published (models without any are left out)."""
    if not models:
        return {}
    found = client.hmget(keys.MODEL_CARDS, models)
    return {model: json.loads(raw) for model, raw in zip(models, found, strict=True) if raw}


def retire(client: redis.Redis, model: str, worker_id: str) -> None:
    """Remove a worker's entry (clean shutdown)."""
    client.zrem(keys.LIVE_WORKERS, f"{model}{_SEP}{worker_id}")


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
