"""Serving logic for OpenAI's Batch API (``/v1/batches``): values or errors, no Flask."""

from __future__ import annotations

import json
import logging
import secrets

import redis

from api.accounts.auth import Principal
from api.batches.runner import BatchRunner
from api.batches.status import BatchStatus
from api.batches.store import Batch, now
from api.http import errors
from api.protocol import (
    BatchCreateRequest,
    BatchList,
    BatchObject,
    BatchRequestCounts,
    BatchUsage,
    ErrorResponse,
)
from api.render import model_not_found
from queueing import replication

log = logging.getLogger(__name__)

WINDOW_SECONDS = {"24h": 24 * 3600}


def create_batch(runner: BatchRunner, principal: Principal, request: BatchCreateRequest
                 ) -> BatchObject | ErrorResponse:
    """``POST /v1/batches``: check the input file, store the batch, dispatch its lines in the background."""
    info = runner.files.get(principal.key_id, request.input_file_id)
    if info is None:
        return errors.error(404, f"No file found with id '{request.input_file_id}'.", "invalid_request_error",
                            "file_not_found", "input_file_id")
    if info.purpose != "batch":
        return errors.invalid_request("The input file must have been uploaded with purpose 'batch'.",
                                      "input_file_id")
    first = next(iter(runner.files.iter_lines(info)), None)
    if first is None or first[1].get("url") != request.endpoint:
        return errors.invalid_request(f"The input file's requests are not for {request.endpoint}.",
                                      "endpoint")
    body = first[1].get("body")
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and (refused := _model_error(runner, principal, model)) is not None:
        return refused
    settings = runner.gateway.settings
    if not replication.accepted(replication.confirm(runner.gateway.redis, settings), settings, "a batch"):
        return errors.unavailable(replication.REFUSED, retry_after=5, code="replication_unavailable")
    created = now()
    batch = runner.store.add(Batch(
        id=f"batch_{secrets.token_hex(12)}", key_id=principal.key_id, input_file_id=info.id,
        endpoint=request.endpoint, model=model if isinstance(model, str) else None,
        completion_window=request.completion_window, status=BatchStatus.VALIDATING.value,
        metadata_json=json.dumps(request.metadata) if request.metadata else None, total=info.line_count,
        dispatched=0, dispatch_done=False, completed=0, failed=0, prompt_tokens=0, completion_tokens=0,
        created_at=created, expires_at=created + WINDOW_SECONDS[request.completion_window],
    ))
    runner.wake(batch.id)  # a coordinator dispatches it
    return batch_object(batch)


def get_batch(runner: BatchRunner, principal: Principal, batch_id: str) -> BatchObject | ErrorResponse:
    """``GET /v1/batches/{id}``."""
    batch = runner.store.get(batch_id, principal.key_id)
    if batch is None:
        return _not_found(batch_id)
    return batch_object(batch)


def list_batches(runner: BatchRunner, principal: Principal, limit: int,
                 after: str | None) -> BatchList | ErrorResponse:
    """``GET /v1/batches``: newest first, ``limit`` per page after the batch ``after``."""
    page = runner.store.page(principal.key_id, limit, after)
    if page is None:
        return errors.invalid_request(f"No batch '{after}' to page after.", "after")
    rows, more = page
    data = [batch_object(b) for b in rows]
    return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=more)


def cancel_batch(runner: BatchRunner, principal: Principal, batch_id: str) -> BatchObject | ErrorResponse:
    """``POST /v1/batches/{id}/cancel``: finished lines are kept and reported."""
    batch = runner.store.get(batch_id, principal.key_id)
    if batch is None:
        return _not_found(batch_id)
    runner.cancel(batch)  # a coordinator winds it down; one past its window expires instead
    fresh = runner.store.get(batch_id)
    return batch_object(fresh or batch)


def batch_object(batch: Batch) -> BatchObject:
    """The wire form of a batch row."""
    usage = BatchUsage(input_tokens=batch.prompt_tokens, output_tokens=batch.completion_tokens,
                       total_tokens=batch.prompt_tokens + batch.completion_tokens)
    return BatchObject(
        id=batch.id, endpoint=batch.endpoint, input_file_id=batch.input_file_id,
        completion_window=batch.completion_window, status=batch.status,
        errors=json.loads(batch.errors_json) if batch.errors_json else None,
        output_file_id=batch.output_file_id, error_file_id=batch.error_file_id,
        created_at=batch.created_at, in_progress_at=batch.in_progress_at, expires_at=batch.expires_at,
        finalizing_at=batch.finalizing_at, completed_at=batch.completed_at, failed_at=batch.failed_at,
        expired_at=batch.expired_at, cancelling_at=batch.cancelling_at, cancelled_at=batch.cancelled_at,
        request_counts=BatchRequestCounts(total=batch.total, completed=batch.completed, failed=batch.failed),
        metadata=json.loads(batch.metadata_json) if batch.metadata_json else None, model=batch.model,
        usage=usage,
    )


def _model_error(runner: BatchRunner, principal: Principal, model: str) -> ErrorResponse | None:
    """404 for a batch whose model (one per input file) no worker serves and the API does not
    name, or that the key may not use, as the chat endpoint answers it; else ``None``.

    The API's own model is taken while its workers are down: the lines wait in its batch
    queue. Any other name would make a Celery queue that nothing consumes (issue 15, H3).
    """
    if not principal.may_use(model):
        return model_not_found(model)
    if model == runner.gateway.settings.served_model_name:
        return None
    try:
        served = runner.gateway.served_models()
    except redis.RedisError:
        return _queue_unavailable(None)
    return None if model in served else model_not_found(model)


def _queue_unavailable(batch_id: str | None) -> ErrorResponse:
    """503 when Redis could not say which models are served: the client may simply retry."""
    log.exception("batch %s: Redis unavailable", batch_id or "listing")
    return errors.unavailable("The queue is unavailable; try again shortly.", code="queue_unavailable")


def _not_found(batch_id: str) -> ErrorResponse:
    return errors.error(404, f"No batch found with id '{batch_id}'.", "invalid_request_error",
                        "batch_not_found", "batch_id")
