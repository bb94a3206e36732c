"""Serving logic for submit-and-poll jobs (``/v1/jobs``).

A job is one chat or completions request run on the batch queue; its record
(in Redis, kept for ``JOB_TTL``) holds status, result and usage. Functions
return a response model or an :class:`ErrorResponse`.
"""

from __future__ import annotations

import json
import time

import redis

from api import errors
from api.auth import Principal
from api.gateway import Charge, Gateway
from api.job_request import parse_job_request
from api.protocol import ErrorInfo, ErrorResponse, JobCreateRequest, JobList, JobObject, UsageInfo
from api.serving import model_not_found
from queueing import events, jobs, keys
from queueing.channel import EventSubscription
from queueing.jobs import JobRecord, JobRequest

MAX_WAIT = 60.0


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
    submitted = gateway.submit_job(job, principal, request.endpoint, metadata, charge)
    return submitted if isinstance(submitted, ErrorResponse) else job_object(submitted)


def get_job(gateway: Gateway, principal: Principal, job_id: str,
            wait: float = 0) -> JobObject | ErrorResponse:
    """``GET /v1/jobs/{id}``; with ``wait``, long-poll up to that many seconds for the end."""
    record = _owned(gateway.redis, principal, job_id)
    if record is None:
        return _not_found(job_id)
    if wait > 0 and not record.status.is_terminal:
        with EventSubscription(gateway.redis, job_id) as subscription:
            deadline = time.monotonic() + min(wait, MAX_WAIT)
            record = jobs.get(gateway.redis, job_id) or record  # it may have ended before we listened
            while not record.status.is_terminal and (left := deadline - time.monotonic()) > 0:
                event = subscription.next_event(left)
                if event is not None and events.is_terminal(event):
                    record = jobs.get(gateway.redis, job_id) or record
    return job_object(record)


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


def job_object(record: JobRecord) -> JobObject:
    """The API's view of a job record (``response``: vLLM's response body)."""
    usage = None
    if record.prompt_tokens is not None:
        usage = events.Usage(record.prompt_tokens, record.completion_tokens or 0)
    response = None
    if record.status is jobs.JobStatus.SUCCEEDED and record.result:
        response = json.loads(record.result)
    error = None
    if record.error and record.status is not jobs.JobStatus.SUCCEEDED:
        error = ErrorInfo(message=record.error, type=record.error_type or "server_error",
                          code=record.error_code)
    return JobObject(
        id=record.id, endpoint=record.endpoint or "", model=record.request.model, status=record.status.value,
        created_at=int(record.created_at), started_at=_int(record.started_at),
        completed_at=_int(record.finished_at), response=response, error=error,
        metadata=json.loads(record.metadata) if record.metadata else None,
        usage=UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        total_tokens=usage.total_tokens) if usage else None,
    )


def _owned(client: redis.Redis, principal: Principal, job_id: str) -> JobRecord | None:
    """The job if it exists and belongs to the caller (others' jobs look missing)."""
    record = jobs.get(client, job_id)
    if record is None or record.key_id != principal.key_id or record.endpoint is None:
        return None
    return record


def _not_found(job_id: str) -> ErrorResponse:
    return errors.error(404, f"No job found with id '{job_id}'.", "invalid_request_error", "job_not_found",
                        "job_id")


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
