"""The coordinator: the API's background work, in a process of its own (``inferq coordinator``).

Gunicorn workers only serve HTTP. One or more coordinators per deployment (running two is
safe: consumer groups and batch leases share the work) do the rest, each on a thread:

- **usage ledger**: drain settled usage from Redis into SQL (:class:`api.accounts.ledger.Ledger`);
- **batch collection**: record finished batch lines and finalize their batches
  (:class:`api.batches.collector.BatchCollector`, its own stream and consumer group);
- **batches**: dispatch new batches, resume ones whose dispatcher died, wind cancelled ones
  down, expire those past their window (:meth:`api.batches.runner.BatchRunner.tend`), at once
  when the API wakes it and every ``COORDINATOR_INTERVAL`` seconds anyway.

It serves its own Prometheus metrics (settled tokens, dead letters) on ``COORDINATOR_METRICS_PORT``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from api.extensions import Services
from queueing import keys

log = logging.getLogger(__name__)

WAKE_WAIT = 1.0  # seconds one blocking wait for a wake-up lasts (stop is seen within it)
HEARTBEAT_TTL = 5.0  # seconds a coordinator's heartbeat (one per wait) counts as live in `inferq status`


class Coordinator:
    """Runs the background work over one process's :class:`~api.extensions.Services`."""

    def __init__(self, services: Services, interval: float | None = None):
        self.services = services
        #: Seconds between two passes over unfinished batches when nothing wakes it.
        self.interval = services.settings.coordinator_interval if interval is None else interval
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self.name = f"{socket.gethostname()}-{os.getpid()}"

    def run_once(self, dispatch_timeout: float = 3600.0) -> None:
        """One round of everything, in order (tests and ``--once``): usage, finished lines, then a
        pass over the batches, waiting up to ``dispatch_timeout`` for the dispatches it started."""
        while self.services.ledger.drain():
            pass
        while self.services.batches.collector.drain():
            pass
        self.services.batches.tend()
        self.services.batches.join_dispatches(dispatch_timeout)

    def start(self) -> None:
        """Start the three loops on daemon threads; :meth:`stop` ends them."""
        self.stop_event = threading.Event()
        self.services.batches.stopping.clear()
        loops: dict[str, Callable[[threading.Event], None]] = {
            "usage-ledger": self.services.ledger.run_forever,
            "batch-collector": self.services.batches.collector.run_forever,
            "batch-tender": self._tend_batches,
        }
        for name, loop in loops.items():
            thread = threading.Thread(target=loop, args=(self.stop_event,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("coordinator started: usage ledger, batch collection, batches (every %.0f s or when woken)",
                 self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every loop and dispatch to stop and wait up to ``timeout`` for them. A dispatch lets go
        of its batch's lease, so the next coordinator resumes it at once (one stuck waiting for
        room holds it until the process ends; then the lease lapses within 30 s)."""
        self.services.batches.stopping.set()
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        self.services.batches.join_dispatches(max(0.0, deadline - time.monotonic()))

    def _tend_batches(self, stop: threading.Event) -> None:
        client = self.services.gateway.redis
        last = float("-inf")
        while not stop.is_set():
            try:
                self._beat(client)
                woken = client.blpop([keys.BATCH_WAKE], timeout=WAKE_WAIT)
                if woken is not None or time.monotonic() - last >= self.interval:
                    last = time.monotonic()
                    self.services.batches.tend()
            except redis.RedisError:
                log.warning("coordinator: Redis unavailable; batches wait", exc_info=True)
                stop.wait(2.0)
            except Exception:  # noqa: BLE001 - keep tending after SQL hiccups
                log.exception("coordinator: a pass over the batches failed; retrying")
                stop.wait(2.0)
        try:
            client.zrem(keys.COORDINATORS, self.name)
        except redis.RedisError:
            pass  # its heartbeat expires by itself

    def _beat(self, client: redis.Redis) -> None:
        now = time.time()
        pipe = client.pipeline(transaction=False)
        pipe.zadd(keys.COORDINATORS, {self.name: now + HEARTBEAT_TTL})
        pipe.zremrangebyscore(keys.COORDINATORS, "-inf", now)
        pipe.execute()
