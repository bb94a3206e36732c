"""Jobs orphaned by a worker that died: found, then run again or failed.

A worker that is SIGKILLed (or whose machine vanishes) leaves its jobs RUNNING.
The job state machine lists every running job with its worker in
:data:`keys.RUNNING_JOBS`; :func:`reap` compares that index with the live
heartbeats and, for each job whose worker is gone:

- puts a job nobody streams (``/v1/jobs``, batch lines) back on the batch queue,
  so it runs again on another worker (same job id, so still exactly one result);
- fails any other job with ``worker_lost`` (its client, if still connected,
  was told so already by the API);
- fails a job that has already been requeued :data:`MAX_ATTEMPTS` times: a
  request that kills every worker it lands on must not take the fleet down.

Every live worker calls :func:`reap` from its heartbeat loop; the Lua step
that claims an orphan is atomic, so several reapers never requeue a job twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import redis
from celery import Celery

from queueing import events, jobs, keys
from queueing.celery_app import enqueue_generation
from queueing.jobs import JobRequest, JobStatus, TransitionRefused

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3

WORKER_LOST = events.Error("The worker running this request stopped; the request did not complete.",
                           status=503, error_type="service_unavailable", code="worker_lost")

# The requeue, RUNNING -> QUEUED in jobs.TRANSITIONS. KEYS[1] job hash, KEYS[2] running index.
# ARGV: job id, the dead worker's index entry, ttl, most attempts, now, then the statuses a
# job may be requeued from (jobs.allowed_sources). Returns 1 requeued, 0 not ours to touch
# (moved on or another reaper claimed it), -1 gone (expired record: index entry dropped),
# -2 out of attempts. Queued again, the job takes its key's queued slot again
# (queueing.key_limits), past the cap if need be: it was admitted once.
_REQUEUE_LUA = jobs.job_script("""
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
local status = redis.call('HGET', KEYS[1], '$status')
if not status then redis.call('HDEL', KEYS[2], ARGV[1]) return -1 end
local allowed = false
for i = 6, #ARGV do
  if ARGV[i] == status then allowed = true end
end
if not allowed then return 0 end
local attempts = tonumber(redis.call('HGET', KEYS[1], '$attempts') or '0')
if attempts >= tonumber(ARGV[4]) then return -2 end
redis.call('HSET', KEYS[1], '$status', '$QUEUED', '$attempts', attempts + 1)
redis.call('HDEL', KEYS[1], '$worker', '$started_at')
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
local slot = redis.call('HGET', KEYS[1], '$queued_slot')
if slot then
  redis.call('ZADD', slot, tonumber(ARGV[5]) + tonumber(ARGV[3]), ARGV[1])
  redis.call('EXPIRE', slot, tonumber(ARGV[3]))
end
return 1
""")


@dataclass(frozen=True)
class Orphan:
    """A running job whose worker no longer sends heartbeats."""

    job_id: str
    entry: str  # ``model\tworker_id``

    @property
    def model(self) -> str:
        return self.entry.split("\t", 1)[0]


def find_orphans(client: redis.Redis) -> list[Orphan]:
    """Running jobs whose worker's heartbeat has expired (two reads in one round trip)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.RUNNING_JOBS)
    pipe.zrangebyscore(keys.LIVE_WORKERS, time.time(), "+inf")
    running, live = pipe.execute()
    alive = set(live)
    return [Orphan(job_id, entry) for job_id, entry in running.items() if entry not in alive]


def reap(client: redis.Redis, celery: Celery, ttl: int) -> tuple[int, int]:
    """Requeue or fail every orphaned job; returns (requeued, failed)."""
    requeued = failed = 0
    for orphan in find_orphans(client):
        record = jobs.get(client, orphan.job_id)
        if record is None:
            client.hdel(keys.RUNNING_JOBS, orphan.job_id)
            continue
        if record.endpoint is None and record.batch_id is None:  # a stream: its client was told
            failed += _fail(client, orphan, ttl, out_of_attempts=False)
            continue
        outcome = client.register_script(_REQUEUE_LUA)(
            keys=[keys.job(orphan.job_id), keys.RUNNING_JOBS],
            args=[orphan.job_id, orphan.entry, ttl, MAX_ATTEMPTS, time.time(),
                  *jobs.allowed_sources(JobStatus.QUEUED)])
        if outcome == 1:
            log.warning("job %s: its worker %s died; running it again", orphan.job_id, orphan.entry)
            _enqueue_again(celery, orphan.job_id, record.request)
            requeued += 1
        elif outcome == -2:
            failed += _fail(client, orphan, ttl, out_of_attempts=True)
    return requeued, failed


def _enqueue_again(celery: Celery, job_id: str, request: JobRequest) -> None:
    enqueue_generation(celery, job_id, request.to_dict(), request.model, batch=True, request_id=job_id)


def fail_running(client: redis.Redis, job_id: str, error: events.Error, ttl: int,
                 completion_tokens: int = 0) -> bool:
    """Fail a RUNNING job whose worker is gone, publishing ``error`` as its terminal event.

    It settles to the prompt its worker admitted plus ``completion_tokens`` (what the
    caller saw streamed; the reaper saw none). False if the job ended meanwhile.
    """
    admitted = client.hget(keys.job(job_id), "admitted_prompt_tokens")
    usage = events.Usage(int(admitted or 0), completion_tokens)
    error = replace(error, usage=usage)
    try:
        jobs.transition(client, job_id, JobStatus.FAILED, ttl, only_from=JobStatus.RUNNING,
                        publish=events.encode(error), finished_at=time.time(),
                        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        error=error.message, error_code=error.code,
                        error_type=error.error_type, error_status=error.status)
    except TransitionRefused:
        return False
    return True


def _fail(client: redis.Redis, orphan: Orphan, ttl: int, *, out_of_attempts: bool) -> bool:
    error = WORKER_LOST
    if out_of_attempts:
        error = events.Error(f"The request stopped {MAX_ATTEMPTS + 1} workers; it is not retried again.",
                             status=500, error_type="server_error", code="worker_lost")
    if not fail_running(client, orphan.job_id, error, ttl):
        return False
    log.warning("job %s: its worker %s died; failed it (%s)", orphan.job_id, orphan.entry, error.code)
    return True

