"""Helpers every /v1 blueprint shares: parse a JSON body, charge tokens, respond."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from flask import Response, g, request
from pydantic import BaseModel, ValidationError

from api import errors
from api.extensions import services
from api.job_request import worst_case_tokens
from api.protocol import ErrorResponse, JSONText
from api.ratelimit import TokenCharge
from queueing.jobs import JobRequest

R = TypeVar("R", bound=BaseModel)


def json_body() -> dict[str, Any] | ErrorResponse:
    """The JSON object the request carries, or a 400 (bodies over ``MAX_REQUEST_BYTES``,
    chunked ones too, got their 413 before auth in ``create_app``)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nested deeper than the JSON decoder recurses
        body = None
    if not isinstance(body, dict):
        return errors.invalid_request(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(send 'Content-Type: application/json').")
    return body


def parse_body(model: type[R]) -> R | ErrorResponse:
    """The JSON body validated as ``model``, or a 400 naming the problem."""
    body = json_body()
    if isinstance(body, ErrorResponse):
        return body
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        return errors.from_validation_error(exc)


def token_charge(job: JobRequest) -> TokenCharge:
    """The request's worst case, for the gateway to charge against the caller's tokens per
    minute once the request passed every other check."""
    svc, principal = services(), g.principal
    tokens = worst_case_tokens(job, svc.settings.max_model_len)
    return TokenCharge(svc.rate_limits, principal.key_id, principal.tpm, tokens)


def send_charge_headers(charge: TokenCharge) -> None:
    """Add the ``x-ratelimit-*-tokens`` headers of a charge that was taken."""
    g.ratelimit_headers = {**g.get("ratelimit_headers", {}), **charge.headers}


def respond(result: BaseModel | ErrorResponse | JSONText | Iterator[str], status: int = 200) -> Response:
    """Map a serving result to HTTP: an error, a JSON body, or an SSE stream."""
    if isinstance(result, ErrorResponse):
        return errors.to_response(result)
    if isinstance(result, JSONText):
        return Response(result.text, status=result.status_code, mimetype="application/json")
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), status=status, mimetype="application/json")
    return Response(result, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
