"""Pub/sub helpers for a job's token-event channel.

The consumer subscribes *before* the job is enqueued (and waits for Redis to
confirm the subscription), so not even an immediate first token can be missed.
Subscriptions share their process's one pub/sub connection
(:mod:`queueing.subscriber`).
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from queueing import events, keys
from queueing.subscriber import Inbox, PendingInbox, subscriber_for


def publish(client: redis.Redis, job_id: str, event: events.TokenEvent) -> None:
    """Publish one token event on the job's channel."""
    client.publish(keys.job_events(job_id), events.encode(event))


class EventSubscription:
    """A confirmed subscription to one job's events.

    Raises ``redis.TimeoutError`` if Redis does not confirm it within ``timeout``
    seconds, and ``redis.ConnectionError`` (then or while reading) if the
    connection to Redis fails.
    """

    def __init__(self, client: redis.Redis, job_id: str, timeout: float = 5.0):
        self.job_id = job_id
        self._inbox = subscriber_for(client).subscribe(keys.job_events(job_id).encode(), timeout)

    @classmethod
    def start(cls, client: redis.Redis, job_id: str) -> PendingSubscription:
        """Send the subscription now and wait for Redis's confirmation later
        (:meth:`PendingSubscription.confirmed`), doing other round trips meanwhile."""
        channel = keys.job_events(job_id).encode()
        return PendingSubscription(job_id, subscriber_for(client).start_subscribe(channel))

    @classmethod
    def _of(cls, job_id: str, inbox: Inbox) -> EventSubscription:
        subscription = cls.__new__(cls)
        subscription.job_id, subscription._inbox = job_id, inbox
        return subscription

    def next_event(self, timeout: float) -> events.TokenEvent | None:
        """The next event, or ``None`` if none arrives within ``timeout`` seconds."""
        raw = self._inbox.get(timeout)
        return None if raw is None else events.decode(raw)

    def next_events(self, timeout: float) -> list[events.TokenEvent]:
        """Every event received and not yet read, in order (waiting up to ``timeout``
        seconds for the first), or ``[]``."""
        return [events.decode(raw) for raw in self._inbox.get_all(timeout)]

    def divert(self, handler: Callable[[bytes], None] | None) -> None:
        """Hand each raw event to ``handler`` on the subscriber's reader as it arrives,
        instead of queueing it for :meth:`next_events` (``None``: queue again); see
        :meth:`queueing.subscriber.Inbox.divert`."""
        self._inbox.divert(handler)

    def enqueue(self, raw: bytes) -> None:
        """Queue a raw event for :meth:`next_events` (what a diverting handler does not take)."""
        self._inbox.enqueue(raw)

    def wake(self) -> None:
        """End a wait in :meth:`next_events` now (it returns ``[]``)."""
        self._inbox.wake()

    def close(self) -> None:
        """Unsubscribe (idempotent); events published later are dropped."""
        self._inbox.close()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingSubscription:
    """A subscription to a job's events that Redis has not confirmed yet."""

    def __init__(self, job_id: str, pending: PendingInbox):
        self.job_id = job_id
        self._pending = pending

    def confirmed(self, timeout: float = 5.0) -> EventSubscription:
        """The subscription once confirmed: nothing published from now on is missed
        (``redis.TimeoutError`` / ``redis.ConnectionError`` otherwise, and it is closed)."""
        return EventSubscription._of(self.job_id, self._pending.confirmed(timeout))

    def close(self) -> None:
        """Give it up without waiting."""
        self._pending.close()
