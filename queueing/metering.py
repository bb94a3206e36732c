"""Token metering shared by API and workers: the quota day and the exact top-up.

The API reserves a job's worst case when it creates the job
(:func:`queueing.jobs.create`); the terminal transition settles it
(:func:`queueing.jobs.transition`). In between, the worker knows the exact
prompt length and moves the reservation to the exact worst case with
:func:`adjust_reservation` before the engine sees the request, refusing the job if
a larger reservation would cross the quota. So no key ever ends past its quota.
"""

from __future__ import annotations

import datetime as dt

import redis

from queueing import keys
from queueing.jobs import job_script


def quota_day(now: dt.datetime | None = None) -> str:
    """The UTC day a quota counter belongs to, ``YYYY-MM-DD``."""
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d")


def seconds_until_next_day(now: dt.datetime | None = None) -> int:
    """Seconds until the quota resets (next UTC midnight), at least 1."""
    now = now or dt.datetime.now(dt.UTC)
    tomorrow = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()))


# KEYS[1] job hash. ARGV[1] the exact worst case, ARGV[2] the prompt's tokens. Returns
# {1, new reservation} or {0, used, reserved, limit} when the larger reservation does not fit.
_ADJUST_LUA = job_script("""
local f = redis.call('HMGET', KEYS[1], '$quota_key', '$reserved_tokens', '$quota_limit', '$status')
if f[4] ~= '$RUNNING' then return {1, tonumber(f[2] or '0')} end
redis.call('HSET', KEYS[1], '$admitted_prompt_tokens', ARGV[2])
if not f[1] then return {1, tonumber(f[2] or '0')} end
local held, needed = tonumber(f[2] or '0'), tonumber(ARGV[1])
local delta = needed - held
if delta == 0 then return {1, held} end
if redis.call('EXISTS', f[1]) == 0 then
  redis.call('HSET', KEYS[1], '$reserved_tokens', needed)
  return {1, needed}
end
local limit = tonumber(f[3] or '-1')
if delta > 0 and limit >= 0 then
  local used = tonumber(redis.call('HGET', f[1], 'used') or '0')
  local reserved = tonumber(redis.call('HGET', f[1], 'reserved') or '0')
  if used + reserved + delta > limit then return {0, used, reserved, limit} end
end
redis.call('HINCRBY', f[1], 'reserved', delta)
redis.call('HSET', KEYS[1], '$reserved_tokens', needed)
return {1, needed}
""")


def adjust_reservation(client: redis.Redis, job_id: str, needed: int, *, prompt_tokens: int = 0) -> bool:
    """Hold exactly ``needed`` tokens for a running job; False if that would cross its quota.

    ``prompt_tokens`` (the tokenized prompt) is kept on the job as ``admitted_prompt_tokens``,
    so a job failed without its worker still settles its prompt. Jobs without a quota
    counter always pass.
    """
    result = client.register_script(_ADJUST_LUA)(keys=[keys.job(job_id)], args=[needed, prompt_tokens])
    return bool(result[0])
