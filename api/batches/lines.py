"""The lines of a batch's output and error files, in OpenAI's format, and the job ids of its lines.

Output lines look like ``{"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}``; a line that never ran has ``response: null`` and an ``error``
with a code (``batch_cancelled``, ``batch_expired``, ``result_expired``).
"""

from __future__ import annotations

import json
from typing import Any

from api.batches.store import LineResult
from api.render import job_object
from queueing.jobs import JobRecord, JobStatus

EXPIRED = {"code": "batch_expired",
           "message": "This request could not be executed before the completion window expired."}
CANCELLED = {"code": "batch_cancelled", "message": "The batch was cancelled."}


def line_job_id(batch_id: str, seq: int) -> str:
    """The job id of a batch's ``seq``-th dispatched line (1-based)."""
    return f"{batch_id}-{seq}"


def line_seq(job_id: str) -> int:
    """The ``seq`` of a line's job id (0 if it is not one)."""
    tail = job_id.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def output_line(custom_id: str, request_id: str, status_code: int, body: dict[str, Any] | None,
                error: dict[str, Any] | None = None) -> str:
    """One line of an output or error file, in OpenAI's format."""
    response = None if body is None else {"status_code": status_code, "request_id": request_id, "body": body}
    return json.dumps({"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": response,
                       "error": error}, separators=(",", ":"))


def unrun_line(batch_id: str, custom_id: str, line_no: int, job_id: str, error: dict[str, str],
               prompt_tokens: int = 0, completion_tokens: int = 0) -> LineResult:
    """The failed result of a line that did not run (or whose result was lost): no response, an error."""
    return LineResult(batch_id, custom_id, line_no, False, output_line(custom_id, job_id, 0, None, error),
                      prompt_tokens, completion_tokens)


def line_result(record: JobRecord, stop_reason: dict[str, str]) -> LineResult:
    """The result of a batch line's finished job; ``stop_reason`` is the error of a cancelled one."""
    assert record.batch_id and record.custom_id
    line_no = record.batch_line or 0
    usage = (record.prompt_tokens or 0, record.completion_tokens or 0)
    job = job_object(record)
    if record.status is JobStatus.SUCCEEDED and job.response is not None:
        line = output_line(record.custom_id, record.id, 200, job.response)
        return LineResult(record.batch_id, record.custom_id, line_no, True, line, *usage)
    if record.status is JobStatus.CANCELLED:
        return unrun_line(record.batch_id, record.custom_id, line_no, record.id, stop_reason, *usage)
    error = job.error.model_dump() if job.error else {"message": "failed", "type": "server_error"}
    line = output_line(record.custom_id, record.id, record.error_status or 500, {"error": error})
    return LineResult(record.batch_id, record.custom_id, line_no, False, line, *usage)


def lost_result(batch_id: str, custom_id: str, line_no: int, fields: dict[str, str]) -> LineResult:
    """The failed result of a line whose job ended but whose record expired before it was recorded
    (``fields``: its usage-stream entry)."""
    error = {"code": "result_expired", "message": f"The request ended ({fields.get('status')}) but its "
             "result expired before the batch recorded it."}
    return unrun_line(batch_id, custom_id, line_no, fields["job_id"], error,
                      int(fields.get("prompt_tokens") or 0), int(fields.get("completion_tokens") or 0))
