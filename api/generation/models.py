"""``GET /v1/models``: the models that live workers serve, as their vLLM lists them."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, g, jsonify

from api.accounts.guard import require_api_key
from api.extensions import services
from api.http import errors

bp = Blueprint("models", __name__, url_prefix="/v1")


@bp.get("/models")
@require_api_key
def list_models() -> Response:
    """OpenAI's model list; each card is the one vLLM's server lists (``root``, ``max_model_len``)."""
    gateway = services().gateway
    try:
        names = [n for n in gateway.served_models() if g.principal.may_use(n)]
        cards = gateway.model_cards(names)
    except redis.RedisError:
        return errors.to_response(errors.unavailable("The queue is unavailable.", code="queue_unavailable"))
    return jsonify(object="list", data=cards)
