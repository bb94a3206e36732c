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
        """Unsubscribe and give the connection back to the pool."""
        try:
            self._pubsub.close()
        except redis.RedisError:
            pass

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
