"""``POST /v1/chat/completions`` and ``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from flask import Blueprint, Response, g, request
from pydantic import BaseModel, ValidationError

from api import errors, serving
from api.admission import worst_case_tokens
from api.auth import require_api_key
from api.extensions import services
from api.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse

bp = Blueprint("completions", __name__, url_prefix="/v1")
R = TypeVar("R", bound=BaseModel)


def _parse(model: type[R]) -> R | ErrorResponse:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return errors.invalid_request(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(send 'Content-Type: application/json').")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        return errors.from_validation_error(exc)


def _respond(result: serving.Served) -> Response:
    if isinstance(result, ErrorResponse):
        return errors.to_response(result)
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), mimetype="application/json")
    return _event_stream(result)


def _event_stream(frames: Iterator[str]) -> Response:
    return Response(frames, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _endpoint(model: type[Any], serve: Callable[..., serving.Served]) -> Response:
    parsed = _parse(model)
    if isinstance(parsed, ErrorResponse):
        return errors.to_response(parsed)
    svc, principal = services(), g.principal
    tokens = worst_case_tokens(parsed.to_params(), svc.settings.max_model_len)
    try:
        decision = svc.rate_limits.hit_tokens(principal.key_id, principal.tpm, tokens)
    except redis.RedisError:
        return errors.to_response(errors.unavailable("The queue is unavailable.", code="queue_unavailable"))
    g.ratelimit_headers = {**g.get("ratelimit_headers", {}), **decision.headers}
    if decision.error is not None:
        return errors.to_response(decision.error)
    return _respond(serve(svc.gateway, parsed, principal))


@bp.post("/chat/completions")
@require_api_key
def chat_completions() -> Response:
    """Chat completion, buffered or streamed as SSE."""
    return _endpoint(ChatCompletionRequest, serving.serve_chat)


@bp.post("/completions")
@require_api_key
def completions() -> Response:
    """Legacy text completion, buffered or streamed as SSE."""
    return _endpoint(CompletionRequest, serving.serve_completion)
