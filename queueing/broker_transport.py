"""kombu's Redis transports, with one Redis client per channel for publishes and acks.

kombu's Redis channel builds a new ``redis.Redis`` client (over its one connection pool)
for every message it sends and every ack it writes (``Channel.conn_or_acquire``). The
client's constructor copies about 170 response callbacks, so that cost about 240 µs per
task sent: a third of the API's ``send_task`` and more than the LPUSH it wraps. A client
over a pool is safe to share between threads and greenlets (each command takes a pooled
connection), so these channels build one and keep it until their pools are dropped
(after a fork, or when the channel closes).

:func:`install` makes kombu's ``redis://``, ``rediss://`` and ``sentinel://`` URLs use them,
so the broker URL, its options and what Flower reads back from it stay kombu's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis


class _SharedClient:
    """Mixin for a kombu Redis channel: ``conn_or_acquire`` yields one kept client."""

    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()  # type: ignore[attr-defined]
        yield self._shared_client

    def _disconnect_pools(self) -> None:
        self._shared_client = None  # it holds the pool being dropped
        super()._disconnect_pools()  # type: ignore[misc]


class Channel(_SharedClient, kombu_redis.Channel):
    """kombu's Redis channel, one client kept."""


class Transport(kombu_redis.Transport):
    """kombu's Redis transport (``redis://``, ``rediss://``) with :class:`Channel`."""

    Channel = Channel


class SentinelChannel(_SharedClient, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel, one client kept (a failover reconnects: a new channel)."""


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (``sentinel://``) with :class:`SentinelChannel`."""

    Channel = SentinelChannel


def install() -> None:
    """Make kombu resolve the ``redis``, ``rediss`` and ``sentinel`` URL schemes to these
    transports (idempotent; :mod:`queueing.celery_app` calls it before building its app).

    kombu offers no call for this: its alias table is where it looks schemes up, and a
    scheme it already resolved in this process is dropped from its cache of classes.
    """
    for scheme, name in (("redis", "Transport"), ("rediss", "Transport"), ("sentinel", "SentinelTransport")):
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{name}"
        kombu.transport._transport_cache.pop(scheme, None)
