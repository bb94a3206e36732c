"""Per-key caps on what one key holds at once, so that no key takes what every key shares.

Every key may hold at most ``KEY_MAX_STREAMS`` open requests (interactive requests, streamed
or not, and ``GET /v1/jobs/{id}?wait=`` long-polls: each holds a connection and a pub/sub
subscription), ``KEY_MAX_QUEUED_JOBS`` jobs waiting for a worker (interactive requests and
``/v1/jobs`` jobs) and ``KEY_MAX_BATCH_LINES_IN_FLIGHT`` batch lines queued or running.

Each cap counts in a Redis sorted set per key (:func:`keys.key_slots`). Its members hold a
slot each, scored by the time the slot lapses if nothing releases it: a backstop for a
holder that vanished (an API process killed during a long-poll, a job record Redis lost).

- A job takes its slots when it is created, in the same atomic step as its quota reservation
  (:func:`queueing.jobs.create`), so API processes admitting at the same instant never
  overshoot a cap. The record names its slots (``queued_slot``, ``held_slot``) and the state
  machine gives them back: the queued slot when the job leaves QUEUED, the held slot in its
  one terminal transition (worker-lost failures and cancels included); the reaper's requeue
  (:mod:`queueing.recovery`) takes the queued slot again.
- A long-poll holds a streams slot while it waits (:func:`hold` / :func:`release`).

Uploads reserve their bytes here while they are stored (:func:`reserve_bytes`): the files
table holds what a key has stored, and a reservation covers an upload between its check and
its row, so concurrent uploads of one key cannot both pass on the same total.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass

import redis

from config import Settings
from queueing import keys
from queueing.jobs import JobRecord


class Kind(enum.StrEnum):
    STREAMS = "streams"
    QUEUED = "queued"
    BATCH_LINES = "batch-lines"


@dataclass(frozen=True)
class KeyLimits:
    """The caps every key has (0: none)."""

    streams: int = 0
    queued: int = 0
    batch_lines: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyLimits:
        return cls(settings.key_max_streams, settings.queued_jobs_cap, settings.key_max_batch_lines_in_flight)

    def cap(self, kind: Kind) -> int:
        caps = {Kind.STREAMS: self.streams, Kind.QUEUED: self.queued, Kind.BATCH_LINES: self.batch_lines}
        return caps[kind]


def kind_of(slot: str) -> Kind:
    """The kind of a :func:`keys.key_slots` set."""
    return Kind(slot.rsplit(":", 1)[1])


def assign(record: JobRecord, limits: KeyLimits) -> dict[str, int]:
    """Name on ``record`` the slots it takes, and return each slot set's cap.

    An interactive request holds a stream until it ends and a queued slot while it waits; a
    ``/v1/jobs`` job a queued slot; a batch line a batch-lines slot until it ends. Kinds
    without a cap are not counted.
    """
    if record.key_id is None:
        return {}
    if record.batch_id is not None:
        held, queued = Kind.BATCH_LINES, None
    elif record.endpoint is not None:
        held, queued = None, Kind.QUEUED
    else:
        held, queued = Kind.STREAMS, Kind.QUEUED
    caps: dict[str, int] = {}
    if held is not None and limits.cap(held) > 0:
        record.held_slot = keys.key_slots(record.key_id, held)
        caps[record.held_slot] = limits.cap(held)
    if queued is not None and limits.cap(queued) > 0:
        record.queued_slot = keys.key_slots(record.key_id, queued)
        caps[record.queued_slot] = limits.cap(queued)
    return caps


def in_use(client: redis.Redis, key_id: str, kind: Kind) -> int:
    """How many of the key's ``kind`` slots are held now (lapsed ones not counted)."""
    return int(client.zcount(keys.key_slots(key_id, kind), time.time(), "+inf"))


# KEYS[1] the slot set. ARGV: now, cap (0 = none), seconds until the slot lapses, member.
_HOLD_LUA = """
local now, lapse = tonumber(ARGV[1]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[2])
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], now + lapse, ARGV[4])
if redis.call('TTL', KEYS[1]) < lapse then redis.call('EXPIRE', KEYS[1], math.ceil(lapse)) end
return 1
"""


def hold(client: redis.Redis, key_id: str, kind: Kind, cap: int, seconds: float) -> str | None:
    """Take one of the key's ``kind`` slots for at most ``seconds``: its id, or ``None`` when
    the key holds ``cap`` already. Give it back with :func:`release`."""
    member = f"hold:{uuid.uuid4().hex}"
    taken = client.register_script(_HOLD_LUA)(keys=[keys.key_slots(key_id, kind)],
                                               args=[time.time(), cap, seconds, member])
    return member if taken else None


def release(client: redis.Redis, key_id: str, kind: Kind, member: str) -> None:
    """Give back a slot :func:`hold` took."""
    client.zrem(keys.key_slots(key_id, kind), member)


# KEYS[1] the key's pending uploads. ARGV: now, seconds until the entry lapses, member
# (``token:bytes``). Adds the entry; returns the bytes of every pending upload, this one included.
_RESERVE_BYTES_LUA = """
local now, lapse = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lapse, ARGV[3])
if redis.call('TTL', KEYS[1]) < lapse then redis.call('EXPIRE', KEYS[1], math.ceil(lapse)) end
local total = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  total = total + tonumber(string.match(member, ':(%d+)$'))
end
return total
"""


def reserve_bytes(client: redis.Redis, key_id: str, size: int, seconds: float) -> tuple[str, int]:
    """Reserve ``size`` bytes for an upload being stored (for at most ``seconds``).

    Returns the reservation's id and the bytes every pending upload of the key reserves,
    this one included. Read the key's stored bytes *after* this: an upload stored meanwhile
    is then either still reserved or already stored, never missed (maybe counted twice,
    which only refuses more).
    """
    member = f"{uuid.uuid4().hex}:{size}"
    total = client.register_script(_RESERVE_BYTES_LUA)(keys=[keys.key_pending_bytes(key_id)],
                                                         args=[time.time(), seconds, member])
    return member, int(total)


def release_bytes(client: redis.Redis, key_id: str, member: str) -> None:
    """Drop a reservation once its upload is stored (or refused)."""
    client.zrem(keys.key_pending_bytes(key_id), member)
