"""Renderers that several features share: a job record as the API shows it (``/v1/jobs``
and each line of a batch's output file), and the answer for an unknown model (generation,
jobs, batches)."""

from __future__ import annotations

import json

from api.http import errors
from api.protocol import ErrorInfo, ErrorResponse, JobObject, UsageInfo
from queueing import events, jobs
from queueing.jobs import JobRecord


def model_not_found(model: str) -> ErrorResponse:
    """OpenAI's answer for a model that does not exist or that the key may not use."""
    return errors.error(404, f"The model '{model}' does not exist or you do not have access to it.",
                        "invalid_request_error", "model_not_found", "model")


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


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)
