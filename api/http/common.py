"""Helpers every /v1 blueprint shares: parse a JSON body, respond."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

from flask import Response, request
from pydantic import BaseModel, ValidationError

from api.http import errors
from api.protocol import ErrorResponse, JSONText

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


def respond(result: BaseModel | ErrorResponse | JSONText | Iterator[bytes], status: int = 200) -> Response:
    """Map a serving result to HTTP: an error, a JSON body, or an SSE stream."""
    if isinstance(result, ErrorResponse):
        return errors.to_response(result)
    if isinstance(result, JSONText):
        return Response(result.text, status=result.status_code, mimetype="application/json")
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), status=status, mimetype="application/json")
    return Response(result, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
