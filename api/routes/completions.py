"""``POST /v1/chat/completions`` and ``POST /v1/completions``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g

from api import serving
from api.auth import require_api_key
from api.extensions import services
from api.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from api.routes.common import parse_body, respond, send_charge_headers, token_charge

bp = Blueprint("completions", __name__, url_prefix="/v1")


def _endpoint(model: type[Any], serve: Callable[..., serving.Served]) -> Response:
    parsed = parse_body(model)
    if isinstance(parsed, ErrorResponse):
        return respond(parsed)
    params = parsed.to_params()
    charge = token_charge(params)  # taken by the gateway after its checks, before the job exists
    served = serve(services().gateway, parsed, params, g.principal, charge)
    send_charge_headers(charge)
    return respond(served)


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
