"""Serving logic for submit-and-poll jobs (``/v1/jobs``).

A job is one chat or completions request run on the batch queue; its record
(in Redis, kept for ``JOB_TTL``) holds status, result and usage. Functions
return a response model or an :class:`ErrorResponse`.
"""

from __future__ import annotations

import json
import logging
import time

import redis

from api.accounts.auth import Principal
from api.generation.gateway import Charge, Gateway, cap_reached
from api.generation.job_request import parse_job_request
from api.http import errors
from api.protocol import ErrorResponse, JobCreateRequest, JobList, JobObject
from api.render import job_object, model_not_found
from queueing import events, jobs, key_limits, keys, replication
from queueing.channel import EventSubscription
from queueing.jobs import JobRecord, JobRequest

log = logging.getLogger(__name__)

MAX_WAIT = 60.0
WAIT_SLOT_GRACE = 30.0  # a long-poll's stream slot lapses this long after its wait, if never given back


def parse_job(request: JobCreateRequest) -> JobRequest | ErrorResponse:
    """The job's request, checked like a direct request; jobs are never streamed."""
    job = parse_job_request(request.endpoint, request.body, param_prefix="body.")
    if isinstance(job, JobRequest) and job.stream:
        return errors.invalid_request("Jobs are not streamed: leave out 'stream' (poll the job instead).",
                                      "body.stream")
    return job


def create_job(gateway: Gateway, principal: Principal, request: JobCreateRequest,
               job: JobRequest, charge: Charge | None = None) -> JobObject | ErrorResponse:
    """``POST /v1/jobs``: queue the job at batch priority."""
    if not principal.may_use(job.model):
        return model_not_found(job.model)
    metadata = json.dumps(request.metadata) if request.metadata else None
    since = replication.fence(gateway.redis, gateway.settings)
    if not replication.accepted(since, gateway.settings, "a job"):
        return _refused()
    submitted = gateway.submit_job(job, principal, request.endpoint, metadata, charge)
    if isinstance(submitted, ErrorResponse):
        return submitted
    confirmation = replication.confirm(gateway.redis, gateway.settings, since)
    if not replication.accepted(confirmation, gateway.settings, f"job {submitted.id}"):
        try:  # refused after all (the replica left meanwhile): it must not run, if it has not yet
            jobs.request_cancel(gateway.redis, submitted.id, gateway.settings.job_ttl)
        except redis.RedisError:
            log.exception("job %s: refused, but could not be cancelled", submitted.id)
        return _refused()
    return job_object(submitted)


def _refused() -> ErrorResponse:
    return errors.unavailable(replication.REFUSED, retry_after=5, code="replication_unavailable")


def get_job(gateway: Gateway, principal: Principal, job_id: str,
            wait: float = 0) -> JobObject | ErrorResponse:
    """``GET /v1/jobs/{id}``; with ``wait``, long-poll up to that many seconds for the end."""
    record = _owned(gateway.redis, principal, job_id)
    if record is None:
        return _not_found(job_id)
    if wait > 0 and not record.status.is_terminal:
        # A long-poll holds a connection and a subscription: it takes one of the key's stream slots.
        cap, kind, wait = gateway.settings.key_max_streams, key_limits.Kind.STREAMS, min(wait, MAX_WAIT)
        slot = key_limits.hold(gateway.redis, principal.key_id, kind, cap, wait + WAIT_SLOT_GRACE)
        if slot is None:
            return cap_reached(kind, cap)
        try:
            record = _wait_for_end(gateway, record, wait)
        finally:
            key_limits.release(gateway.redis, principal.key_id, kind, slot)
    return job_object(record)


def _wait_for_end(gateway: Gateway, record: JobRecord, wait: float) -> JobRecord:
    """The job once it ended, or as it is after ``wait`` seconds."""
    with EventSubscription(gateway.redis, record.id) as subscription:
        deadline = time.monotonic() + wait
        record = jobs.get(gateway.redis, record.id) or record  # it may have ended before we listened
        while not record.status.is_terminal and (left := deadline - time.monotonic()) > 0:
            event = subscription.next_event(left)
            if event is not None and events.is_terminal(event):
                record = jobs.get(gateway.redis, record.id) or record
    return record


def list_jobs(gateway: Gateway, principal: Principal, limit: int,
              after: str | None) -> JobList | ErrorResponse:
    """``GET /v1/jobs``: the caller's jobs, newest first, ``limit`` per page after ``after``."""
    index = keys.jobs_of(principal.key_id)
    start = 0
    if after:
        rank = gateway.redis.zrevrank(index, after)
        if rank is None:
            return errors.invalid_request(f"No job '{after}' to page after.", "after")
        start = int(rank) + 1  # type: ignore[arg-type]
    ids: list[str] = gateway.redis.zrevrange(index, start, start + limit)  # type: ignore[assignment]
    records = [jobs.get(gateway.redis, job_id) for job_id in ids[:limit]]
    data = [job_object(r) for r in records if r is not None]
    return JobList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                   has_more=len(ids) > limit)


def cancel_job(gateway: Gateway, principal: Principal, job_id: str) -> JobObject | ErrorResponse:
    """``POST /v1/jobs/{id}/cancel``: a queued job never runs; a running one is aborted in the engine."""
    if _owned(gateway.redis, principal, job_id) is None:
        return _not_found(job_id)
    jobs.request_cancel(gateway.redis, job_id, gateway.settings.job_ttl)
    record = jobs.get(gateway.redis, job_id)
    return job_object(record) if record else _not_found(job_id)


def _owned(client: redis.Redis, principal: Principal, job_id: str) -> JobRecord | None:
    """The job if it exists and belongs to the caller (others' jobs look missing)."""
    record = jobs.get(client, job_id)
    if record is None or record.key_id != principal.key_id or record.endpoint is None:
        return None
    return record


def _not_found(job_id: str) -> ErrorResponse:
    return errors.error(404, f"No job found with id '{job_id}'.", "invalid_request_error", "job_not_found",
                        "job_id")
