"""Replication before a promise: ``WAIT`` until replicas hold what the API is about to accept.

Redis replicates asynchronously: a primary that dies takes with it the writes its replicas
had not received yet. Before the API answers 202 (a ``/v1/jobs`` job, a batch) it writes a
mark and sends ``WAIT n timeout`` on the same connection. WAIT returns once ``n`` replicas
have that connection's last write, and replication is one ordered stream, so a replica that
holds the mark holds every write made before it on any connection: the job record, its
quota reservation, Celery's message.

That holds only if the writes and the WAIT went to the same primary. A failover between
them (a command retried onto the new primary) would let the new primary vouch for writes it
never had, so :func:`fence` reads the primary's replication id before the writes and
:func:`confirm` compares it after the WAIT: a promoted replica has a new one.

``REDIS_WAIT_POLICY`` says what a shortfall means: ``refuse`` (503; the fence WAITs too, so
while no replica acknowledges nothing is written at all, and a job refused by the second WAIT
is cancelled) or ``warn`` (accepted, with a logged warning).

A worker's writes cannot be refused (a job's end happened), so :func:`replicate` applies
them, WAITs, and when the primary changed in between applies them again on the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis

from config import Settings
from queueing import keys

log = logging.getLogger(__name__)

#: Written just before each WAIT, so the connection's last write is at least as late as
#: every write it must cover.
MARK = f"{keys.PREFIX}:replication-mark"

#: The 503's message when the policy refuses (nothing about hosts: see the log).
REFUSED = ("Redis could not confirm that a replica holds this request, so it was not accepted "
           "(a failover could lose it); try again shortly.")


@dataclass(frozen=True)
class Confirmation:
    """How many replicas acknowledged, of how many wanted; the primary's replication id; and
    whether that primary is not the one a :func:`fence` saw."""

    acked: int
    wanted: int
    replid: str | None = None
    failed_over: bool = False

    @property
    def ok(self) -> bool:
        return self.acked >= self.wanted and not self.failed_over


def fence(client: redis.Redis, settings: Settings) -> Confirmation:
    """Before the writes that :func:`confirm` will cover: the primary's replication id and,
    under the ``refuse`` policy, a WAIT, so work that would be refused is never written (it
    could run before the refusal). No round trip when no WAIT is asked for."""
    refuse = settings.redis_wait_policy == "refuse"
    return _wait(client, settings, None, wait=refuse) if settings.wait_replicas else Confirmation(0, 0)


def confirm(client: redis.Redis, settings: Settings, since: Confirmation | None = None) -> Confirmation:
    """WAIT for ``REDIS_WAIT_REPLICAS`` replicas, at most ``REDIS_WAIT_TIMEOUT_MS``; a primary
    that is not the one ``since`` (a :func:`fence`) saw counts as a shortfall. Never raises:
    a Redis error counts as no acknowledgement."""
    return _wait(client, settings, since, wait=True) if settings.wait_replicas else Confirmation(0, 0)


def primary(client: redis.Redis, settings: Settings) -> Confirmation:
    """The primary's replication id before writes that :func:`confirm` will cover, with no WAIT
    (for writes that are never refused). No round trip when no WAIT is asked for."""
    return _wait(client, settings, None, wait=False) if settings.wait_replicas else Confirmation(0, 0)


def replicate(client: redis.Redis, settings: Settings, write: Callable[[bool], None], what: str,
              attempts: int = 3) -> Confirmation:
    """Apply ``write`` and WAIT until the replicas hold it; if the primary changed between the
    two (a promoted replica may not have it), apply it again on the new primary, at most
    ``attempts`` times. ``write(again)`` must be idempotent (``again`` is True on a re-apply).
    A shortfall is logged, never raised: ``what`` has happened and is recorded as well as can be.
    With no WAIT asked for, ``write(False)`` alone."""
    again = False
    for _ in range(attempts):
        since = primary(client, settings)
        write(again)
        confirmation = confirm(client, settings, since)
        if not confirmation.failed_over:
            break
        log.warning("%s: the primary changed or failed while it was written; writing it again", what)
        again = True
    if not confirmation.ok:
        log.warning("%s: %d of %d replica(s) acknowledged it within %d ms%s: a failover now could lose it",
                    what, confirmation.acked, confirmation.wanted, settings.redis_wait_timeout_ms,
                    " (the primary kept changing)" if confirmation.failed_over else "")
    return confirmation


def _wait(client: redis.Redis, settings: Settings, since: Confirmation | None, *, wait: bool) -> Confirmation:
    wanted = settings.wait_replicas
    try:
        pipe = client.pipeline(transaction=False)  # one connection: the WAIT covers the INCR
        if wait:
            pipe.incr(MARK)
            pipe.execute_command("WAIT", wanted, settings.redis_wait_timeout_ms)
        pipe.info("replication")
        *replies, info = pipe.execute()
    except redis.RedisError:
        return Confirmation(0, wanted, failed_over=True)
    replid = str(info["master_replid"])
    acked = int(replies[1]) if wait else wanted  # not measured by a fence under the warn policy
    return Confirmation(acked, wanted, replid, since is not None and since.replid != replid)


def accepted(confirmation: Confirmation, settings: Settings, what: str) -> bool:
    """Whether ``what`` may be accepted: confirmed, or short under the ``warn`` policy (logged)."""
    if confirmation.ok:
        return True
    why = ("the primary changed or failed while it was written" if confirmation.failed_over else
           f"{confirmation.acked} of {confirmation.wanted} replica(s) acknowledged it within "
           f"{settings.redis_wait_timeout_ms} ms")
    if settings.redis_wait_policy == "warn":
        log.warning("%s accepted although %s: a failover now could lose it", what, why)
        return True
    log.warning("%s refused (503): %s (REDIS_WAIT_POLICY=refuse)", what, why)
    return False
