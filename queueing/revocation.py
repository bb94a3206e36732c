"""Stop a revoked key's jobs in Redis: every job it pays for that is queued or running is cancelled.

The key's own indexes list most of its jobs: its ``/v1/jobs`` (``keys.jobs_of``) and the
slot sets of its per-key caps (``queueing.key_limits``: open requests, queued jobs, batch
lines). A cap set to 0 keeps no set, so the candidates also come from where any live work
can be, all of it bounded: the running-job index (one entry per busy engine slot), the
interactive queues of the given models (at most ``MAX_QUEUE_DEPTH`` each) and the messages
workers have taken but not acknowledged (Celery's prefetch). A job found there is cancelled
when its record names the key and it has not ended. Batch lines are also their batch's to
cancel (``api.accounts.revocation``).

A queued job is cancelled with its ``cancelled`` event (a stream waiting for it ends at
once); a running one is aborted by its worker, which publishes the event with its usage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator

import redis

from queueing import jobs, keys
from queueing.jobs import JobStatus
from queueing.key_limits import Kind

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash
#: (``Channel.unacked_key``): a worker's prefetched tasks wait there, still queued.
KOMBU_UNACKED = "unacked"
CHUNK = 500  # list items or job records read per round trip
_LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def cancel_jobs_of_key(client: redis.Redis, key_id: str, models: Iterable[str], ttl: int) -> int:
    """Cancel every queued or running job ``key_id`` pays for; returns how many were cancelled.

    ``models``: the served models whose interactive queues may hold its requests.
    """
    candidates = {*_indexed_jobs(client, key_id), *_running_jobs(client)}
    for model in models:
        candidates.update(_queued_jobs(client, keys.model_queue(model)))
    candidates.update(_taken_jobs(client))
    return cancel_jobs(client, sorted(candidates), ttl, key_id=key_id)


def cancel_jobs(client: redis.Redis, job_ids: list[str], ttl: int, key_id: str | None = None) -> int:
    """Cancel those of ``job_ids`` still queued or running (and paid by ``key_id``, when given).

    Their records are read ``CHUNK`` to a round trip; each live one then takes
    :func:`jobs.request_cancel` (an atomic transition announcing ``cancelled``, or a
    message to the worker running it). Returns how many were cancelled.
    """
    cancelled = 0
    for first in range(0, len(job_ids), CHUNK):
        chunk = job_ids[first:first + CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(keys.job(job_id), "status", "key_id")
        for job_id, (status, owner) in zip(chunk, pipe.execute(), strict=True):
            if status not in _LIVE or key_id not in (None, owner):
                continue
            if jobs.request_cancel(client, job_id, ttl, announce=True) in _LIVE:
                cancelled += 1
    return cancelled


def _indexed_jobs(client: redis.Redis, key_id: str) -> list[str]:
    """The key's ``/v1/jobs`` jobs and the jobs holding its capped slots (ended ones included;
    they are skipped later). Long-polls hold slots too (``hold:...``): they are no jobs."""
    pipe = client.pipeline(transaction=False)
    for index in (keys.jobs_of(key_id), *(keys.key_slots(key_id, kind) for kind in Kind)):
        pipe.zrange(index, 0, -1)
    return [str(member) for members in pipe.execute() for member in members
            if not str(member).startswith("hold:")]


def _running_jobs(client: redis.Redis) -> list[str]:
    """Every running job, of every key."""
    return [str(job_id) for job_id in client.hkeys(keys.RUNNING_JOBS)]


def _queued_jobs(client: redis.Redis, queue: str) -> Iterator[str]:
    """The job ids of the Celery messages waiting in ``queue`` (a Redis list)."""
    start = 0
    while raw := client.lrange(queue, start, start + CHUNK - 1):
        for message in raw:
            job_id = _task_id(message)
            if job_id:
                yield job_id
        start += CHUNK


def _taken_jobs(client: redis.Redis) -> Iterator[str]:
    """The job ids of messages workers have taken and not yet acknowledged (prefetched)."""
    for raw in client.hvals(KOMBU_UNACKED):
        try:
            message = json.loads(raw)[0]
        except (ValueError, IndexError, KeyError, TypeError):
            continue
        job_id = _task_id(message)
        if job_id:
            yield job_id


def _task_id(message: str | bytes | dict[str, object]) -> str | None:
    """The task id (= job id) of a Celery message, or ``None`` for what is not one."""
    try:
        data = json.loads(message) if isinstance(message, (str, bytes)) else message
        headers = data.get("headers") or {}
        task_id = headers.get("id") if isinstance(headers, dict) else None
    except (ValueError, AttributeError):
        return None
    return task_id if isinstance(task_id, str) else None
