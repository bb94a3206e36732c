"""``GET /v1/usage``: the calling key's token usage, today and by day and model."""

from __future__ import annotations

import datetime as dt

import redis
from flask import Blueprint, Response, g, jsonify, request

from api.accounts.auth import Principal
from api.accounts.guard import require_api_key
from api.extensions import services
from api.http import errors
from queueing import keys, metering

bp = Blueprint("usage", __name__, url_prefix="/v1")

DEFAULT_DAYS = 7
MAX_DAYS = 366


def _date_range() -> tuple[dt.date, dt.date] | errors.ErrorResponse:
    today = dt.datetime.now(dt.UTC).date()
    try:
        end = dt.date.fromisoformat(request.args.get("end_date", today.isoformat()))
        start = dt.date.fromisoformat(
            request.args.get("start_date", (end - dt.timedelta(days=DEFAULT_DAYS - 1)).isoformat()))
    except ValueError:
        return errors.invalid_request("start_date and end_date must be dates like 2026-01-31.", "start_date")
    if start > end or (end - start).days >= MAX_DAYS:
        return errors.invalid_request(f"The date range must be ordered and span at most {MAX_DAYS} days.",
                                      "start_date")
    return start, end


def _quota(principal: Principal, day: str) -> dict[str, int | None]:
    if principal.daily_tokens is None:
        return {"limit": None, "used": None, "reserved": None, "remaining": None}
    counter = services().gateway.redis.hgetall(keys.quota(principal.key_id, day))
    used = int(counter.get("used", 0)) if counter else services().ledger.used_on(principal.key_id, day)
    reserved = int(counter.get("reserved", 0)) if counter else 0
    return {"limit": principal.daily_tokens, "used": used, "reserved": reserved,
            "remaining": max(principal.daily_tokens - used - reserved, 0)}


@bp.get("/usage")
@require_api_key
def usage() -> Response:
    """Today's totals, the daily quota, and per-day, per-model history (``start_date``, ``end_date``)."""
    span = _date_range()
    if isinstance(span, errors.ErrorResponse):
        return errors.to_response(span)
    svc, principal = services(), g.principal
    try:
        svc.ledger.catch_up()  # read-your-writes: include usage settled a moment ago, on any API host
        today = metering.quota_day()
        quota = _quota(principal, today)
    except redis.RedisError:
        return errors.to_response(errors.unavailable("The queue is unavailable.", code="queue_unavailable"))
    rows = svc.ledger.history(principal.key_id, *span)
    day = dt.date.fromisoformat(today)
    today_rows = svc.ledger.history(principal.key_id, day, day)
    prompt = sum(r.prompt_tokens for r in today_rows)
    completion = sum(r.completion_tokens for r in today_rows)
    totals = {"date": today, "requests": sum(r.requests for r in today_rows), "prompt_tokens": prompt,
              "completion_tokens": completion, "total_tokens": prompt + completion}
    return jsonify({
        "object": "usage",
        "key": {"id": principal.key_id, "name": principal.name, "prefix": principal.prefix},
        "today": totals,
        "daily_quota": quota,
        "start_date": span[0].isoformat(),
        "end_date": span[1].isoformat(),
        "data": [{"date": r.day, "model": r.model, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                  "completion_tokens": r.completion_tokens, "total_tokens": r.total_tokens} for r in rows],
    })
