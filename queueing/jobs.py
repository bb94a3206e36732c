"""The job record and its state machine.

A job is a Redis hash that expires ``JOB_TTL`` seconds after its last write; its
fields are :class:`JobRecord`'s, and the Lua scripts that touch it are rendered
from that definition (:func:`job_script`). Every status change is a move of
:data:`TRANSITIONS`, checked and written atomically by one Lua script:
:func:`transition` makes every move but the requeue (RUNNING -> QUEUED), optionally
publishing the job's terminal event in the same step so status and event never
disagree; :mod:`queueing.recovery` makes the requeue as it claims a job whose worker
died, with the sources the same table allows.
"""

from __future__ import annotations

import enum
import json
import string
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

from queueing import events, keys


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Allowed ``from -> {to}`` moves; terminal statuses have none. RUNNING -> QUEUED is a
#: requeue: the job's worker died and it runs again (``queueing.recovery``).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                  JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def allowed_sources(target: JobStatus) -> list[str]:
    """Statuses from which ``target`` may be reached."""
    return [src.value for src, dests in TRANSITIONS.items() if target in dests]


def new_job_id() -> str:
    """A fresh, unguessable job id."""
    return uuid.uuid4().hex


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"
#: The endpoints a job may run: each is answered by vLLM's own serving layer on the worker.
ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES, TOKENIZE, DETOKENIZE)
#: The endpoints that generate tokens (the others only use the tokenizer).
GENERATING = (CHAT, COMPLETIONS, RESPONSES)


@dataclass(frozen=True)
class JobRequest:
    """One OpenAI request as a job carries it: the endpoint and the client's JSON body, untouched.

    The API reads only what admission needs (model, stream, token bounds); the worker
    parses ``body`` with vLLM's request models, so every field vLLM's server accepts works.
    """

    endpoint: str
    model: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        """Whether the client asked for Server-Sent Events."""
        return self.body.get("stream") is True

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "model": self.model, "body": self.body}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRequest:
        return cls(endpoint=data["endpoint"], model=data["model"], body=data["body"])


@dataclass
class JobRecord:
    """One job as stored in Redis."""

    id: str
    request: JobRequest
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    result: str | None = None  # the response body of a buffered request that succeeded
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_status: int | None = None
    # Metering: who pays, the day's quota counter, and the tokens held for this job.
    key_id: str | None = None
    quota_key: str | None = None
    quota_day: str | None = None
    quota_limit: int | None = None
    reserved_tokens: int = 0
    # Jobs submitted through /v1/jobs: listed per key, with the caller's metadata (JSON).
    endpoint: str | None = None
    metadata: str | None = None
    # Lines of a batch (/v1/batches): which batch, and the line's custom_id.
    batch_id: str | None = None
    custom_id: str | None = None
    batch_line: int | None = None
    # Per-key caps (queueing.key_limits): the slot set left when the job leaves QUEUED, and
    # the one left when it ends.
    queued_slot: str | None = None
    held_slot: str | None = None
    # Written by Lua only: the prompt's tokens as its worker admitted them
    # (queueing.metering), and how many times the job was requeued (queueing.recovery).
    admitted_prompt_tokens: int | None = None
    attempts: int | None = None

    def to_hash(self) -> dict[str, str]:
        """Flatten for ``HSET``; ``None`` fields are left out."""
        out: dict[str, str] = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            if name == "request":
                out[name] = json.dumps(value, separators=(",", ":"))
            elif isinstance(value, JobStatus):
                out[name] = value.value
            else:
                out[name] = str(value)
        return out

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> JobRecord:
        floats = ("created_at", "started_at", "finished_at")
        ints = ("prompt_tokens", "completion_tokens", "quota_limit", "reserved_tokens", "error_status",
                "batch_line", "admitted_prompt_tokens", "attempts")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "request":
                kwargs[name] = JobRequest.from_dict(json.loads(value))
            elif name == "status":
                kwargs[name] = JobStatus(value)
            elif name in floats:
                kwargs[name] = float(value)
            elif name in ints:
                kwargs[name] = int(value)
            elif name in cls.__dataclass_fields__:
                kwargs[name] = value
        return cls(**kwargs)


def job_script(template: str) -> str:
    """Lua text with the job hash's layout filled in from :class:`JobRecord` and :class:`JobStatus`.

    In ``template``, ``$name`` stands for the field ``name`` of the job hash and ``$STATUS``
    for that status's value (``$QUEUED`` -> ``queued``). Render once, at import: a name
    neither defines raises ``KeyError`` there rather than in Redis.
    """
    names = {f.name: f.name for f in fields(JobRecord)} | {s.name: s.value for s in JobStatus}
    return string.Template(template).substitute(names)


class TransitionRefused(Exception):
    """The job is missing or its status does not allow the move."""

    def __init__(self, job_id: str, current: str | None, target: JobStatus):
        self.current = JobStatus(current) if current else None
        super().__init__(f"job {job_id}: {current or 'missing'} -> {target.value} refused")


class QuotaExceeded(Exception):
    """Admitting the job would push its key past the daily token quota."""

    def __init__(self, used: int, reserved: int, limit: int):
        self.used, self.reserved, self.limit = used, reserved, limit
        super().__init__(f"quota: {used} used + {reserved} reserved of {limit}")


class JobExists(Exception):
    """A job with this id exists already (a batch line dispatched a second time)."""


class QuotaUnseeded(Exception):
    """The day's quota counter is missing (new day, or Redis lost it): seed it from SQL."""


class CapReached(Exception):
    """Admitting the job would take its key past the cap of one of its slot sets."""

    def __init__(self, slot: str, cap: int):
        self.slot, self.cap = slot, cap
        super().__init__(f"{slot}: {cap} held")


# KEYS[1] job hash, KEYS[2] quota hash or '', KEYS[3] index zset or '', KEYS[4..3+n] the
# key's slot sets the job joins (queueing.key_limits). ARGV: job ttl, tokens to reserve,
# limit (-1 = none), quota ttl, seed for 'used' ('' = none), created_at, job id, n, the n
# sets' caps, then the job's field/value pairs. A full slot set returns {-3, its index, cap}.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {-2, 0, 0} end
local n, now = tonumber(ARGV[8]), tonumber(ARGV[6])
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[3 + i], '-inf', now)
  if redis.call('ZCARD', KEYS[3 + i]) >= tonumber(ARGV[8 + i]) then return {-3, i, ARGV[8 + i]} end
end
local used, reserved = 0, 0
if KEYS[2] ~= '' then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    if ARGV[5] == '' then return {-1, 0, 0} end
    redis.call('HSET', KEYS[2], 'used', ARGV[5], 'reserved', 0)
  end
  used = tonumber(redis.call('HGET', KEYS[2], 'used') or '0')
  reserved = tonumber(redis.call('HGET', KEYS[2], 'reserved') or '0')
  local amount, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
  if limit >= 0 and used + reserved + amount > limit then return {0, used, reserved} end
  reserved = redis.call('HINCRBY', KEYS[2], 'reserved', amount)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
for i = 9 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
for i = 1, n do
  redis.call('ZADD', KEYS[3 + i], now + tonumber(ARGV[1]), ARGV[7])
  redis.call('EXPIRE', KEYS[3 + i], tonumber(ARGV[1]))
end
if KEYS[3] ~= '' then
  local created = tonumber(ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', created - tonumber(ARGV[1]))
  redis.call('ZADD', KEYS[3], created, ARGV[7])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[1]))
end
return {1, used, reserved}
"""

# KEYS[1] job hash, KEYS[2] channel or '', KEYS[3] usage stream, KEYS[4] running index,
# KEYS[5] batch-lines stream (a batch line's entry goes there too, for the batch collector).
# ARGV: target, ttl, message, settle ('1' for terminal targets), job id, running-index
# entry ('' = none), n_sources, sources..., field/value pairs.
# Settling moves the job's reserved tokens to 'used' in its quota counter (if that
# still exists) and appends the job's usage to the ledger stream: exactly once,
# because only one terminal transition can ever apply. Leaving QUEUED gives back the
# job's queued slot, settling its held slot (queueing.key_limits).
_TRANSITION_LUA = job_script("""
local current = redis.call('HGET', KEYS[1], '$status')
if not current then return {0, false} end
local n = tonumber(ARGV[7])
local ok = false
for i = 8, 7 + n do
  if ARGV[i] == current then ok = true end
end
if not ok then return {0, current} end
redis.call('HSET', KEYS[1], '$status', ARGV[1])
for i = 8 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
if ARGV[6] ~= '' then redis.call('HSET', KEYS[4], ARGV[5], ARGV[6]) end
local slots = redis.call('HMGET', KEYS[1], '$queued_slot', '$held_slot')
if current == '$QUEUED' and slots[1] then redis.call('ZREM', slots[1], ARGV[5]) end
if ARGV[4] == '1' and slots[2] then redis.call('ZREM', slots[2], ARGV[5]) end
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[4], ARGV[5])
  local f = redis.call('HMGET', KEYS[1], '$key_id', '$quota_key', '$reserved_tokens', '$quota_day',
                      '$prompt_tokens', '$completion_tokens', '$request', '$id', '$batch_id')
  if f[1] then
    local prompt, completion = tonumber(f[5] or '0'), tonumber(f[6] or '0')
    if f[2] and redis.call('EXISTS', f[2]) == 1 then
      -- A counter re-seeded while this job ran never held its reservation: never below 0.
      if redis.call('HINCRBY', f[2], 'reserved', -tonumber(f[3] or '0')) < 0 then
        redis.call('HSET', f[2], 'reserved', 0)
      end
      redis.call('HINCRBY', f[2], 'used', prompt + completion)
    end
    redis.call('HSET', KEYS[1], '$reserved_tokens', 0)
    local entry = {'job_id', f[8], 'key_id', f[1], 'model', cjson.decode(f[7]).model, 'day', f[4] or '',
                   'prompt_tokens', prompt, 'completion_tokens', completion, 'status', ARGV[1]}
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000000, '*', unpack(entry))
    if f[9] and f[9] ~= '' then  -- a batch line: the same entry, naming its batch, for the collector
      table.insert(entry, 'batch_id')
      table.insert(entry, f[9])
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', 1000000, '*', unpack(entry))
    end
  end
end
if KEYS[2] ~= '' then redis.call('PUBLISH', KEYS[2], ARGV[3]) end
return {1, current}
""")


def create(client: redis.Redis, record: JobRecord, ttl: int, *, quota_ttl: int = 2 * 86400,
           seed_used: int | None = None, index: str | None = None, caps: dict[str, int] | None = None) -> int:
    """Store a new job record; if it names a quota counter, reserve its tokens first.

    ``index`` names a sorted set (by creation time) the job is listed in; ``caps`` the
    key's slot sets it joins, each with its cap (``queueing.key_limits.assign``).
    Atomic: either every slot set has room, the reservation fits under
    ``record.quota_limit`` and the job exists, or nothing changed. Returns the key's
    reserved total. Raises :class:`CapReached`, :class:`QuotaExceeded`,
    :class:`JobExists` (nothing reserved), or :class:`QuotaUnseeded` when the day's
    counter is missing and ``seed_used`` (the day's usage from SQL) was not given.
    """
    pairs: list[str] = []
    for name, value in record.to_hash().items():
        pairs += [name, value]
    limit = -1 if record.quota_limit is None else record.quota_limit
    slots = list(caps or {})
    script = client.register_script(_CREATE_LUA)
    status, used, reserved = script(
        keys=[keys.job(record.id), record.quota_key or "", index or "", *slots],
        args=[ttl, record.reserved_tokens, limit, quota_ttl, "" if seed_used is None else seed_used,
              record.created_at, record.id, len(slots), *(caps or {}).values(), *pairs],
    )
    if status == -2:
        raise JobExists(record.id)
    if status == -3:
        raise CapReached(slots[int(used) - 1], int(reserved))
    if status == -1:
        raise QuotaUnseeded(record.quota_key)
    if status == 0:
        raise QuotaExceeded(int(used), int(reserved), limit)
    return int(reserved)


def get(client: redis.Redis, job_id: str) -> JobRecord | None:
    """The job record, or ``None`` if it never existed or expired."""
    data = client.hgetall(keys.job(job_id))
    return JobRecord.from_hash(data) if data else None  # type: ignore[arg-type]


def transition(
    client: redis.Redis,
    job_id: str,
    target: JobStatus,
    ttl: int,
    *,
    publish: str | bytes | None = None,
    only_from: JobStatus | None = None,
    model: str | None = None,
    **fields: Any,
) -> JobStatus:
    """Move a job to ``target`` and set ``fields``, atomically.

    If ``publish`` is given it is published on the job's event channel in the
    same atomic step. ``only_from`` narrows the allowed sources to one status.
    A move to RUNNING names the served ``model`` and sets ``worker``: the job is
    listed in the running index until it ends (see ``queueing.recovery``).
    Returns the previous status; raises :class:`TransitionRefused` when the
    move is not allowed, and for every move to QUEUED: a requeue is
    :mod:`queueing.recovery`'s.
    """
    # The requeue is recovery's own script: it also claims the orphan and counts the attempt.
    sources = [] if target is JobStatus.QUEUED else allowed_sources(target)
    if only_from is not None:
        sources = [src for src in sources if src == only_from.value]
    pairs: list[str] = []
    for name, value in fields.items():
        if value is not None:
            pairs += [name, str(value)]
    channel = keys.job_events(job_id) if publish is not None else ""
    settle = "1" if target.is_terminal else "0"
    running_entry = ""
    if target is JobStatus.RUNNING:
        if model is None or "worker" not in fields:
            raise ValueError("a RUNNING transition names the model and the worker")
        running_entry = keys.running_entry(model, str(fields["worker"]))
    script = client.register_script(_TRANSITION_LUA)
    applied, current = script(
        keys=[keys.job(job_id), channel, keys.USAGE_STREAM, keys.RUNNING_JOBS, keys.BATCH_LINES_STREAM],
        args=[target.value, ttl, publish or "", settle, job_id, running_entry, len(sources), *sources,
              *pairs],
    )
    if not applied:
        raise TransitionRefused(job_id, current, target)
    return JobStatus(current)


def request_cancel(client: redis.Redis, job_id: str, ttl: int, *, announce: bool = False) -> JobStatus | None:
    """Cancel a job: a queued one never runs; a running one is aborted by its worker.

    ``announce`` publishes a queued job's ``cancelled`` event in the same step, for a stream or
    a waiting poll that listens (a running job's worker publishes it when it aborts).
    Returns the status the job had, or ``None`` if it does not exist.
    """
    try:
        return transition(client, job_id, JobStatus.CANCELLED, ttl, only_from=JobStatus.QUEUED,
                          publish=events.encode(events.Cancelled()) if announce else None,
                          finished_at=time.time())
    except TransitionRefused as refused:
        if refused.current is JobStatus.RUNNING:
            # The worker running it transitions it, with the exact usage, when aborted.
            client.publish(keys.CANCEL_CHANNEL, job_id)
        return refused.current
