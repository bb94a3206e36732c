"""``/v1/batches``: OpenAI's Batch API."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from api.accounts.guard import require_api_key
from api.batches import serving as batch_serving
from api.extensions import services
from api.http import errors
from api.http.common import parse_body, respond
from api.protocol import BatchCreateRequest, ErrorResponse

bp = Blueprint("batches", __name__, url_prefix="/v1")


@bp.post("/batches")
@require_api_key
def create() -> Response:
    """Create a batch from an uploaded JSONL file."""
    parsed = parse_body(BatchCreateRequest)
    if isinstance(parsed, ErrorResponse):
        return respond(parsed)
    return respond(batch_serving.create_batch(services().batches, g.principal, parsed))


@bp.get("/batches")
@require_api_key
def list_batches() -> Response:
    """The caller's batches, newest first (``limit`` 1-100, ``after`` a batch id)."""
    limit = request.args.get("limit", 20, type=int)
    if not 1 <= limit <= 100:
        return respond(errors.invalid_request("limit must be between 1 and 100.", "limit"))
    after = request.args.get("after")
    return respond(batch_serving.list_batches(services().batches, g.principal, limit, after))


@bp.get("/batches/<batch_id>")
@require_api_key
def get(batch_id: str) -> Response:
    """One batch, with its request counts."""
    return respond(batch_serving.get_batch(services().batches, g.principal, batch_id))


@bp.post("/batches/<batch_id>/cancel")
@require_api_key
def cancel(batch_id: str) -> Response:
    """Cancel a batch: it stops dispatching and keeps the lines already done."""
    return respond(batch_serving.cancel_batch(services().batches, g.principal, batch_id))
