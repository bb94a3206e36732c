"""Liveness and readiness probes (no key needed)."""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, Response, jsonify

from api.extensions import services
from api.http import errors

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """The process is up."""
    return jsonify(status="ok")


@bp.get("/ready")
def ready() -> Response:
    """Redis answers and a live worker serves the default model."""
    svc = services()
    model = svc.settings.served_model_name
    try:
        live = svc.gateway.served_models()
    except redis.RedisError:
        log.exception("readiness: Redis unreachable")
        return errors.to_response(errors.unavailable("Redis is unreachable.", code="queue_unavailable"))
    if model not in live:
        return errors.to_response(errors.unavailable(
            f"No live worker serves the model '{model}'.", retry_after=10, code="no_live_worker"))
    return jsonify(status="ready", models=live)
