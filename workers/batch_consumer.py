"""Consumes a model's batch queue with at most a fixed share of the engine's slots.

Celery's worker consumes the interactive queue only. Batch work (jobs, batch
lines) arrives as ordinary Celery task messages on a second queue, consumed
here through kombu with a QoS prefetch of exactly ``slots`` unacknowledged
messages: batch work can never hold more than its share, and never a slot or a
prefetched message that an interactive request needs. Messages are
acknowledged late, after the line ran, from the consumer thread (kombu channels
are not thread-safe); a killed worker's lines are redelivered like Celery's.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from kombu import Consumer, Exchange, Queue
from kombu.message import Message

log = logging.getLogger(__name__)

#: Called with a message's job id, generation parameters and task keyword arguments.
Handler = Callable[[str, dict[str, Any], dict[str, Any]], None]

#: Seconds one wait for messages lasts while lines run and a slot is free: a line that finishes
#: meanwhile is acknowledged when the wait returns (with every slot busy, at once).
BUSY_WAIT = 0.2
#: ... and while none runs: nothing waits for an acknowledgement then, and each wait costs the
#: worker's CPU (kombu's poll cycle), so an idle consumer wakes once a second, not five times.
IDLE_WAIT = 1.0


class BatchConsumer:
    """A background consumer of one batch queue, ``slots`` lines at a time."""

    def __init__(self, app: Celery, queue_name: str, slots: int, handle: Handler):
        self.app = app
        self.queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
        self.slots = slots
        self.handle = handle
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="batch")
        self._finished: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._running = 0  # lines taken and not yet acknowledged (the consumer thread's count)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-consumer", daemon=True)
        self._starting = threading.Lock()

    def start(self) -> None:
        """Start consuming in a background thread (once; later calls do nothing)."""
        with self._starting:
            if self._thread.ident is None and not self._stop.is_set():
                self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking lines, let running ones finish and acknowledge them, then return."""
        with self._starting:
            self._stop.set()
        if self._thread.ident is not None:  # never started: nothing taken, nothing to acknowledge
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # noqa: BLE001 - connection trouble: retry
                log.warning("batch consumer lost the broker (%s); reconnecting", exc)
                self._stop.wait(1.0)

    def _consume(self) -> None:
        with self.app.connection_for_read() as connection, connection.channel() as channel:
            consumer = Consumer(channel, queues=[self.queue], accept=["json"], prefetch_count=self.slots,
                                on_message=self._on_message)
            with consumer:
                while not self._stop.is_set():
                    self._acknowledge_finished()
                    if self._running >= self.slots:
                        # Every slot runs a line: kombu takes nothing until one is acknowledged,
                        # so wait for that, and acknowledge it at once (its slot takes the next).
                        self._await_finished(IDLE_WAIT)
                        continue
                    try:
                        connection.drain_events(timeout=BUSY_WAIT if self._running else IDLE_WAIT)
                    except TimeoutError:
                        pass
                consumer.cancel()
                # Acknowledge in-flight lines before the channel closes, or kombu
                # would put them back on the queue for a second run.
                self._pool.shutdown(wait=True)
                self._acknowledge_finished()

    def _on_message(self, message: Message) -> None:
        try:
            args, kwargs = message.decode()[:2]  # Celery protocol 2 body: [args, kwargs, embed]
            job_id, params, context = args[0], args[1], dict(kwargs or {})
        except (ValueError, TypeError, IndexError, KeyError):
            log.error("dropping a malformed batch message")
            message.ack()
            return
        self._running += 1
        self._pool.submit(self._execute, message, job_id, params, context)

    def _execute(self, message: Message, job_id: str, params: dict[str, Any],
                 context: dict[str, Any]) -> None:
        try:
            self.handle(job_id, params, context)
        except Exception:  # noqa: BLE001 - the runner already reported the job's failure
            log.exception("batch job %s failed", job_id)
        finally:
            self._finished.put(message)

    def _await_finished(self, timeout: float) -> None:
        """Acknowledge the next line to finish, waiting up to ``timeout`` seconds for it."""
        try:
            message = self._finished.get(timeout=timeout)
        except queue.Empty:
            return
        self._running -= 1
        message.ack()

    def _acknowledge_finished(self) -> None:
        while True:
            try:
                message = self._finished.get_nowait()
            except queue.Empty:
                return
            self._running -= 1
            message.ack()
