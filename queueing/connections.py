"""Redis clients, one pool per URL per process."""

from __future__ import annotations

import functools

import redis

#: Each open stream holds one pub/sub connection for its lifetime, so an API process
#: needs as many connections as it has streams open (redis-py's default cap is 100).
MAX_CONNECTIONS = 10_000


@functools.lru_cache(maxsize=8)
def get_redis(url: str) -> redis.Redis:
    """A shared client for ``url`` that returns ``str`` values."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        max_connections=MAX_CONNECTIONS,
        health_check_interval=30,
        socket_connect_timeout=2,
        retry_on_timeout=True,
    )
