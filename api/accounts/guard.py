"""Authenticating a request: ``Authorization: Bearer <key>`` or ``X-API-Key`` (:func:`require_api_key`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis
from flask import g, request

from api.accounts.auth import display_prefix
from api.accounts.ratelimit import auth_gate
from api.extensions import services
from api.http import errors, metrics

log = logging.getLogger(__name__)


def presented_key() -> str | None:
    """The key in the request headers, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    """Reject the request with 401 unless it carries a valid key; sets ``g.principal``.

    The brute-force gate (``api.accounts.ratelimit.AuthFailureGate``) sees wrong keys only: each is
    counted, and once its address used up its budget it is answered 429 instead of 401. A
    missing key is no guess and is not counted (anonymous probes behind a proxy would otherwise
    lock out every client), and a valid key is served whatever its address did: it never
    reaches the gate, so it costs no Redis call either. The key is therefore looked up before
    the gate is asked: to serve a valid key from a blocked address its lookup must run anyway,
    so asking the gate first would save no lookup and add a round trip to every request.
    """

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        key = presented_key()
        if key is None:
            metrics.AUTH_FAILURES.labels("missing_key").inc()
            return errors.to_response(errors.error(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'.", "invalid_request_error", "missing_api_key"))
        principal = services().keys.verify(key)
        if principal is None:
            blocked = auth_gate()  # one Redis call: counted, or 429 if the address is blocked
            if blocked is not None:
                return errors.to_response(blocked)
            metrics.AUTH_FAILURES.labels("invalid_key").inc()
            log.info("rejected API key %s", display_prefix(key))
            return errors.to_response(errors.error(
                401, f"Incorrect API key provided: {display_prefix(key)}", "invalid_request_error",
                "invalid_api_key"))
        g.principal = principal
        try:
            decision = services().rate_limits.hit_request(principal.key_id, principal.rpm)
        except redis.RedisError:
            log.exception("rate limiter unavailable")
            return errors.to_response(errors.unavailable("The service is unavailable; try again shortly.",
                                                         code="queue_unavailable"))
        g.ratelimit_headers = decision.headers
        if decision.error is not None:
            return errors.to_response(decision.error)
        return view(*args, **kwargs)

    return wrapped
