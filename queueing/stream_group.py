"""One consumer of a Redis stream's consumer group: read, set aside, acknowledge.

The usage ledger and the batch-line collector each drain a stream this way: read what
is new plus what a dead consumer read but never acknowledged (``XAUTOCLAIM`` after
:data:`CLAIM_IDLE_MS`), handle it, then in one transaction set the entries that can never
be handled aside in a dead-letter stream (with why) and acknowledge and delete them all.
The group is the stream's only reader, so an acknowledged entry is deleted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 30_000  # entries a dead consumer read but never acknowledged
DEAD_LETTER_MAX = 100_000  # entries a dead letter keeps (approximately; the oldest go first)

Entry = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class DeadLetter:
    """An entry set aside: where it failed (for example ``invalid``, ``sql`` or ``collect``) and why."""

    entry: Entry
    stage: str
    reason: str


class StreamGroup:
    """This process's consumer in ``group`` on ``stream``; entries it gives up on go to ``dead_letters``."""

    def __init__(self, client: redis.Redis, stream: str, group: str, dead_letters: str):
        self.redis = client
        self.stream = stream
        self.group = group
        self.dead_letters = dead_letters
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._group_ready = False

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def read(self, count: int) -> list[Entry]:
        """Up to ``count`` entries of a dead consumer's, then up to ``count`` new ones."""
        try:
            return self._read(count)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # Redis lost the stream and its group: start over
            return self._read(count)

    def _read(self, count: int) -> list[Entry]:
        self._ensure_group()
        claim: Any = self.redis.xautoclaim(self.stream, self.group, self.consumer, CLAIM_IDLE_MS, count=count)
        fresh: Any = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count)
        return list(claim[1] or []) + [e for _, batch in (fresh or []) for e in batch]

    def others_busy(self) -> bool:
        """Whether another live consumer holds entries it read and is handling now (a dead one's
        wait for ``XAUTOCLAIM``)."""
        self._ensure_group()
        pending: Any = self.redis.xpending_range(self.stream, self.group, min="-", max="+", count=100)
        return any(p["time_since_delivered"] < CLAIM_IDLE_MS for p in pending)

    def acknowledge(self, entries: list[Entry], dead: list[DeadLetter]) -> None:
        """Set the dead entries aside and acknowledge and delete every entry, in one transaction."""
        pipe = self.redis.pipeline()
        for letter in dead:
            entry_id, fields = letter.entry
            kept: dict[Any, Any] = {**fields, "entry_id": entry_id, "stage": letter.stage,
                                    "reason": letter.reason}
            pipe.xadd(self.dead_letters, kept, maxlen=DEAD_LETTER_MAX, approximate=True)
        ids = [entry_id for entry_id, _ in entries]
        if ids:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
        pipe.execute()
        for letter in dead:
            entry_id, fields = letter.entry
            log.error("%s: entry %s (job %r) set aside in %s (%s stage): %s", self.stream, entry_id,
                      fields.get("job_id", "")[:80], self.dead_letters, letter.stage, letter.reason)


def each_apart(handler: Callable[[list[Entry]], None], entries: list[Entry], stage: str,
               is_fault: Callable[[BaseException], bool], describe: Callable[[BaseException], str]
               ) -> list[DeadLetter]:
    """Run ``handler`` on ``entries``; if it fails on their data (``is_fault``), run it on each
    alone. Returns the entries it still fails on, as dead letters of ``stage``. Other errors
    (the database or Redis away) propagate: the entries stay pending and come again."""
    try:
        handler(entries)
        return []
    except Exception as exc:
        if not is_fault(exc):
            raise
        log.warning("%s: handling %d entries failed (%s); handling them one by one", stage, len(entries),
                    describe(exc))
    dead = []
    for entry in entries:
        try:
            handler([entry])
        except Exception as exc:
            if not is_fault(exc):
                raise
            dead.append(DeadLetter(entry, stage, describe(exc)))
    return dead


def drain_forever(drain: Callable[[int], int], stop: threading.Event, what: str, *, interval: float = 1.0,
                  gather: float = 0.25, count: int = 500) -> None:
    """Call ``drain(count)`` until ``stop`` is set.

    After a drain that was not full it waits ``gather`` seconds, so that under load one
    transaction takes many entries rather than one each; after an empty one ``interval``.
    Polls rather than blocking in ``XREADGROUP``, so ``stop`` is seen within a second.
    """
    while not stop.is_set():
        try:
            done = drain(count)
            if done == 0:
                stop.wait(interval)
            elif done < count:
                stop.wait(gather)
        except Exception:  # noqa: BLE001 - keep draining after Redis/SQL hiccups
            log.exception("%s failed; retrying", what)
            stop.wait(2.0)
