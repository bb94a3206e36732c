"""Worker heartbeats in Redis: which models have a live worker right now.

Each worker refreshes its entry every few seconds with an expiry score (and
trims entries that expired); readers only read, counting unexpired entries.
Asking Redis is one round trip, unlike a Celery broadcast.
"""

from __future__ import annotations

import time
from collections import Counter

import redis

from queueing import keys

_SEP = "\t"


def beat(client: redis.Redis, model: str, worker_id: str, ttl: float) -> None:
    """Record that ``worker_id`` serves ``model`` for the next ``ttl`` seconds."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.LIVE_WORKERS, "-inf", now)
    pipe.zadd(keys.LIVE_WORKERS, {f"{model}{_SEP}{worker_id}": now + ttl})
    pipe.execute()


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
