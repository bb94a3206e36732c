"""OpenAI-shaped errors: constructors for each status, and the Flask handlers
that turn every HTTP error (404, 405, 413, 500 ...) into that shape."""

from __future__ import annotations

import logging
import uuid

from flask import Flask, Response, g, has_request_context, jsonify
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from api.protocol import ErrorInfo, ErrorResponse
from queueing import events

log = logging.getLogger(__name__)


def error(status: int, message: str, type_: str, code: str | None = None,
          param: str | None = None, retry_after: int | None = None) -> ErrorResponse:
    """An error value that a router turns into a response."""
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code),
                         status_code=status, retry_after=retry_after)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return error(400, message, "invalid_request_error", code, param)


def from_validation_error(exc: ValidationError) -> ErrorResponse:
    """400 naming the first offending field, as OpenAI does."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    return invalid_request(f"{message} (field: {param})" if param else message, param=param)


def from_event(event: events.Error) -> ErrorResponse:
    """The client-facing error for a job's ``error`` event."""
    return error(event.status, event.message, event.error_type, event.code, event.param)


def internal_error(exc: BaseException | None = None) -> ErrorResponse:
    """500 naming the request id; details go to the log only."""
    ref = (g.get("request_id") if has_request_context() else None) or uuid.uuid4().hex
    log.error("internal error (request id %s)", ref, exc_info=exc)
    return error(500, f"The server had an error while processing your request (request id {ref}).",
                 "server_error")


def unavailable(message: str, retry_after: int = 5, code: str = "service_unavailable") -> ErrorResponse:
    return error(503, message, "service_unavailable", code, retry_after=retry_after)


def current_request_id() -> str | None:
    """The request id of the request being served, if any."""
    return g.get("request_id") if has_request_context() else None


def naming_request(err: ErrorResponse, request_id: str | None) -> ErrorResponse:
    """``err``, its message naming ``request_id`` if it is a server-side error (the logs carry the id)."""
    if err.status_code < 500 or not request_id or request_id in err.error.message:
        return err
    info = err.error.model_copy(update={"message": f"{err.error.message} (request id {request_id})"})
    return err.model_copy(update={"error": info})


def to_response(err: ErrorResponse) -> Response:
    """JSON response with the error's status (and ``Retry-After`` when set).

    Server-side errors name the request id, which the logs carry too.
    """
    response = jsonify(naming_request(err, current_request_id()).model_dump())
    response.status_code = err.status_code
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    return response


_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
               405: "invalid_request_error", 429: "rate_limit_error"}


def register_error_handlers(app: Flask) -> None:
    """Every error the app raises leaves in OpenAI's shape."""

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        if exc.response is not None:  # already rendered (e.g. by the rate limiter's on_breach)
            return exc.response  # type: ignore[return-value]
        status = exc.code or 500
        if status >= 500:
            return to_response(internal_error(exc))
        messages = {
            404: "Unknown endpoint. See /v1/models, /v1/chat/completions, /v1/completions.",
            413: "Request body too large.",
        }
        message = messages.get(status, exc.description or exc.name)
        return to_response(error(status, message, _HTTP_TYPES.get(status, "invalid_request_error")))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        return to_response(internal_error(exc))
