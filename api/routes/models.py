"""``GET /v1/models``: the models that live workers serve."""

from __future__ import annotations

import time

import redis
from flask import Blueprint, Response, g, jsonify

from api import errors
from api.auth import require_api_key
from api.extensions import services
from api.protocol import ModelCard, ModelList

bp = Blueprint("models", __name__, url_prefix="/v1")
_STARTED = int(time.time())


@bp.get("/models")
@require_api_key
def list_models() -> Response:
    """OpenAI's model list."""
    try:
        names = services().gateway.served_models()
    except redis.RedisError:
        return errors.to_response(errors.unavailable("The queue is unavailable.", code="queue_unavailable"))
    visible = [n for n in names if g.principal.may_use(n)]
    return jsonify(ModelList(data=[ModelCard(id=n, created=_STARTED) for n in visible]).model_dump())
