"""Publishes every job's deltas from one thread, one Redis round trip for whatever is ready.

An engine step advances many jobs at once; each job's new frames are handed to
:meth:`DeltaPublisher.send` (from the engine's thread, without blocking it) and the
publisher thread sends everything that is ready in one round trip: one round trip
per engine step, not one per token. Frames of one job that arrive while a round trip
is under way go out together, as one message.

A job's terminal event is published by its runner (atomically with its status),
after :meth:`DeltaPublisher.flush` has seen the job's last delta out.

A round trip with several jobs' messages is one command, a short Lua script that
``PUBLISH``-es them in order (:data:`PUBLISH_ALL`), so it has one reply to read instead
of one per job: 44 instead of 68 µs of CPU per round trip of 16 messages in a quiet
process, and the worker's 11.9 instead of 14.3 µs per token in ``benchmarks.token_path``
(Redis: 3.4 instead of 2.9). Subscribers get the same messages, on the same channels, in
the same order. The thread keeps a connection of its own and writes each round trip packed
in one write (redis-py's pipeline object costs twice as much CPU). A round trip that
fails is retried as redis-py retries a pipeline (the client's retry policy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from queueing import events, keys
from workers import metrics

log = logging.getLogger(__name__)

#: Publishes its arguments' (channel, message) pairs, in order; returns how many.
PUBLISH_ALL = "for i = 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end return #ARGV / 2"


class _Pending:
    """What waits to be published for one job."""

    __slots__ = ("frames", "tokens")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.tokens = 0


class DeltaPublisher:
    """One thread that publishes the deltas of all of a worker's jobs.

    ``on_failure(job_id)`` is called (on the publisher thread) for each job whose deltas
    Redis refused or could not take; its later deltas are dropped.
    """

    def __init__(self, client: redis.Redis, on_failure: Callable[[str], object] = lambda job_id: None):
        self.redis = client
        self.on_failure = on_failure
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._published = threading.Condition(self._lock)
        self._pending: dict[str, _Pending] = {}
        self._in_flight: set[str] = set()
        self._failed: set[str] = set()
        self._connection: redis.Connection | None = None  # the publisher thread's own
        self._idle = True  # the thread waits for work: the next send wakes it
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="delta-publisher", daemon=True)
        self._thread.start()

    def send(self, job_id: str, delta: events.Delta) -> None:
        """Queue ``delta`` for ``job_id`` (any thread; never blocks on Redis)."""
        with self._lock:
            if job_id in self._failed:
                return
            pending = self._pending.get(job_id)
            if pending is None:
                pending = self._pending[job_id] = _Pending()
            pending.frames.append(delta.frames)
            pending.tokens += delta.tokens
            if self._idle:
                self._idle = False
                self._ready.notify()

    def flush(self, job_id: str, timeout: float = 30.0) -> bool:
        """Wait until every delta sent for ``job_id`` is published; then forget the job.

        False when they could not all be published (Redis failed, or ``timeout``).
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while job_id in self._pending or job_id in self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopped:
                    return False
                self._published.wait(left)
            if job_id in self._failed:
                self._failed.discard(job_id)
                return False
            return True

    def stop(self) -> None:
        """Publish what is queued, then end the thread."""
        with self._lock:
            self._stopped = True
            self._ready.notify()
        self._thread.join(timeout=10)

    def _take(self) -> dict[str, _Pending] | None:
        with self._lock:
            while not self._pending:
                if self._stopped:
                    return None
                self._idle = True
                self._ready.wait()
            batch, self._pending = self._pending, {}
            self._in_flight = set(batch)
            return batch

    def _run(self) -> None:
        try:
            self._publish_all()
        finally:
            if self._connection is not None:
                self._connection.disconnect()
                self.redis.connection_pool.release(self._connection)
                self._connection = None

    def _publish_all(self) -> None:
        while (batch := self._take()) is not None:
            failed = self._publish(batch)
            with self._lock:
                self._in_flight = set()
                self._failed.update(failed)
                self._published.notify_all()
            for job_id in failed:
                self.on_failure(job_id)

    def _publish(self, batch: dict[str, _Pending]) -> list[str]:
        """Publish ``batch`` in one round trip; the jobs whose deltas did not go out."""
        messages: list[str | bytes] = []
        for job_id, pending in batch.items():
            frames = pending.frames[0] if len(pending.frames) == 1 else b"".join(pending.frames)
            messages += (keys.job_events(job_id), events.encode(events.Delta(frames, pending.tokens)))
        command = ("PUBLISH", *messages) if len(batch) == 1 else ("EVAL", PUBLISH_ALL, 0, *messages)
        start = time.perf_counter()
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = self.redis.connection_pool.get_connection()
            packed = connection.pack_command(*command)
            # Retried as redis-py retries a pipeline (the client's policy: through a failover)
            connection.retry.call_with_retry(lambda: _round_trip(connection, packed),
                                             lambda error: connection.disconnect())
        except redis.RedisError:
            log.exception("could not publish the deltas of %d job(s); they are aborted", len(batch))
            return list(batch)
        finally:
            metrics.PUBLISH_SECONDS.observe(time.perf_counter() - start)
        return []


def _round_trip(connection: redis.Connection, packed: list[bytes]) -> None:
    """Send a packed command and read its reply (the connection is dropped on a failure)."""
    try:
        connection.send_packed_command(packed, check_health=False)
        connection.read_response()
    except BaseException:
        connection.disconnect()  # its state is unknown; the next attempt reconnects
        raise
