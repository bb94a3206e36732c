"""Worker heartbeats in Redis: which models have a live worker right now.

Each worker refreshes its entry every few seconds with an expiry score; readers
drop expired entries. Asking Redis is one round trip, unlike a Celery broadcast.
"""

from __future__ import annotations

import time
from collections import Counter

import redis

from queueing import keys

_SEP = "\t"


def beat(client: redis.Redis, model: str, worker_id: str, ttl: float) -> None:
    """Record that ``worker_id`` serves ``model`` for the next ``ttl`` seconds."""
    client.zadd(keys.LIVE_WORKERS, {f"{model}{_SEP}{worker_id}": time.time() + ttl})


def retire(client: redis.Redis, model: str, worker_id: str) -> None:
    """Remove a worker's entry (clean shutdown)."""
    client.zrem(keys.LIVE_WORKERS, f"{model}{_SEP}{worker_id}")


def live_models(client: redis.Redis) -> Counter[str]:
    """Served model name -> number of live workers."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.LIVE_WORKERS, "-inf", now)
    pipe.zrangebyscore(keys.LIVE_WORKERS, now, "+inf")
    _, members = pipe.execute()
    return Counter(member.split(_SEP, 1)[0] for member in members)


def is_alive(client: redis.Redis, model: str, worker_id: str) -> bool:
    """True while ``worker_id``'s heartbeat for ``model`` has not expired."""
    score = client.zscore(keys.LIVE_WORKERS, f"{model}{_SEP}{worker_id}")
    return score is not None and float(score) > time.time()
