"""Redis clients, one pool per URL per process."""

from __future__ import annotations

import functools

import redis


@functools.lru_cache(maxsize=8)
def get_redis(url: str) -> redis.Redis:
    """A shared client for ``url`` that returns ``str`` values."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=2,
        retry_on_timeout=True,
    )
