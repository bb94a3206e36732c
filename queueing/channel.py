"""Pub/sub helpers for a job's token-event channel.

The consumer subscribes *before* the job is enqueued (and waits for Redis to
confirm the subscription), so not even an immediate first token can be missed.
"""

from __future__ import annotations

import time

import redis

from queueing import events, keys


def publish(client: redis.Redis, job_id: str, event: events.TokenEvent) -> None:
    """Publish one token event on the job's channel."""
    client.publish(keys.job_events(job_id), events.encode(event))


class EventSubscription:
    """A confirmed subscription to one job's events."""

    def __init__(self, client: redis.Redis, job_id: str):
        self.job_id = job_id
        self._pubsub = client.pubsub(ignore_subscribe_messages=False)
        self._pubsub.subscribe(keys.job_events(job_id))
        self._confirm()

    def _confirm(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._pubsub.get_message(timeout=deadline - time.monotonic())
            if msg and msg["type"] == "subscribe":
                return
        raise redis.TimeoutError("pub/sub subscription not confirmed")

    def next_event(self, timeout: float) -> events.TokenEvent | None:
        """The next event, or ``None`` if none arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            msg = self._pubsub.get_message(timeout=remaining)
            if msg and msg["type"] == "message":
                return events.decode(msg["data"])

    def close(self) -> None:
        """Unsubscribe and give the connection back to the pool, still connected.

        redis-py's own ``PubSub.close`` disconnects the connection it releases, so the
        next command to take it reconnects: one new TCP connection per request. Here the
        subscription waits for Redis to confirm the unsubscribe (the connection is then
        back in normal mode, with nothing left to read) and returns it as it is; if the
        confirmation does not come, it falls back to disconnecting.
        """
        pubsub = self._pubsub
        try:
            if pubsub.connection is not None and self._unsubscribed(pubsub):
                connection, pubsub.connection = pubsub.connection, None
                connection.deregister_connect_callback(pubsub.on_connect)
                pubsub.connection_pool.release(connection)
            pubsub.close()  # resets its state; disconnects only a connection it still holds
        except (redis.RedisError, OSError):
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass

    @staticmethod
    def _unsubscribed(pubsub: redis.client.PubSub, timeout: float = 1.0) -> bool:
        pubsub.unsubscribe()
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            msg = pubsub.get_message(timeout=remaining)  # late token events are dropped here
            if msg and msg["type"] == "unsubscribe" and not msg["data"]:
                return True  # subscribed to nothing: a normal connection again
        return False

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
