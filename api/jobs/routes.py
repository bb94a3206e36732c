"""``/v1/jobs``: submit one request as a job, poll it, list and cancel jobs."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from api.accounts.guard import require_api_key
from api.extensions import services
from api.generation.charges import send_charge_headers, token_charge
from api.http import errors
from api.http.common import parse_body, respond
from api.jobs import serving as job_serving
from api.protocol import ErrorResponse, JobCreateRequest

bp = Blueprint("jobs", __name__, url_prefix="/v1")


@bp.post("/jobs")
@require_api_key
def create() -> Response:
    """Queue a chat or completions request at batch priority; 202 with the job."""
    parsed = parse_body(JobCreateRequest)
    if isinstance(parsed, ErrorResponse):
        return respond(parsed)
    job = job_serving.parse_job(parsed)
    if isinstance(job, ErrorResponse):
        return respond(job)
    charge = token_charge(job)  # taken by the gateway after its checks, before the job exists
    created = job_serving.create_job(services().gateway, g.principal, parsed, job, charge)
    send_charge_headers(charge)
    return respond(created, status=202)


@bp.get("/jobs")
@require_api_key
def list_jobs() -> Response:
    """The caller's jobs, newest first (``limit`` 1-100, ``after`` a job id)."""
    limit = request.args.get("limit", 20, type=int)
    if not 1 <= limit <= 100:
        return respond(errors.invalid_request("limit must be between 1 and 100.", "limit"))
    return respond(job_serving.list_jobs(services().gateway, g.principal, limit, request.args.get("after")))


@bp.get("/jobs/<job_id>")
@require_api_key
def get(job_id: str) -> Response:
    """One job; ``wait`` (seconds, up to 60) long-polls until it ends."""
    wait = request.args.get("wait", 0.0, type=float)
    if not 0 <= wait <= job_serving.MAX_WAIT:
        return respond(errors.invalid_request(f"wait must be between 0 and {job_serving.MAX_WAIT:g}.",
                                              "wait"))
    return respond(job_serving.get_job(services().gateway, g.principal, job_id, wait))


@bp.post("/jobs/<job_id>/cancel")
@require_api_key
def cancel(job_id: str) -> Response:
    """Cancel a job: queued ones never run, running ones are aborted in the engine."""
    return respond(job_serving.cancel_job(services().gateway, g.principal, job_id))
