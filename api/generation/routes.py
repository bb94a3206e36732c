"""The endpoints a worker answers through vLLM's serving layer: chat completions, completions,
the Responses API, and tokenization."""

from __future__ import annotations

from flask import Blueprint, Response, g

from api.accounts.guard import require_api_key
from api.extensions import services
from api.generation import serving
from api.generation.charges import send_charge_headers, token_charge
from api.generation.job_request import parse_job_request
from api.http.common import json_body, respond
from api.protocol import ErrorResponse
from queueing.jobs import CHAT, COMPLETIONS, DETOKENIZE, RESPONSES, TOKENIZE

bp = Blueprint("completions", __name__)


def _run(endpoint: str) -> Response:
    body = json_body()
    if isinstance(body, ErrorResponse):
        return respond(body)
    job = parse_job_request(endpoint, body)
    if isinstance(job, ErrorResponse):
        return respond(job)
    charge = token_charge(job)  # taken by the gateway after its checks, before the job exists
    served = serving.serve(services().gateway, job, g.principal, charge)
    send_charge_headers(charge)
    return respond(served)


@bp.post("/v1/chat/completions")
@require_api_key
def chat_completions() -> Response:
    """Chat completion, buffered or streamed as SSE."""
    return _run(CHAT)


@bp.post("/v1/completions")
@require_api_key
def completions() -> Response:
    """Legacy text completion, buffered or streamed as SSE."""
    return _run(COMPLETIONS)


@bp.post("/v1/responses")
@require_api_key
def responses() -> Response:
    """OpenAI's Responses API, buffered or streamed as SSE events."""
    return _run(RESPONSES)


@bp.post("/tokenize")
@require_api_key
def tokenize() -> Response:
    """Token ids of a prompt or of chat messages (vLLM's ``/tokenize``)."""
    return _run(TOKENIZE)


@bp.post("/detokenize")
@require_api_key
def detokenize() -> Response:
    """Text of token ids (vLLM's ``/detokenize``)."""
    return _run(DETOKENIZE)
