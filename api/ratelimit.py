"""Rate limits: per key requests and tokens per minute, per client IP on the rest.

Per key limits are dynamic (each key has its own RPM/TPM) and need OpenAI's
``x-ratelimit-*-requests`` and ``-tokens`` headers on every response, so they
use the ``limits`` library (Flask-Limiter's engine) directly over Redis:

- requests per minute: a moving window (exact count of the last 60 s, one
  atomic Lua call per request);
- tokens per minute: a sliding-window counter, charged with the request's
  worst case at admission as OpenAI does (a moving window would store one
  Redis entry per token).

Per IP limits (probes and failed authentication) are plain Flask-Limiter.
All counters live in Redis, so the limits hold across API processes and hosts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from flask import Flask, Response
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from api import errors, metrics
from config import Settings
from queueing import keys


def _reset(seconds: float) -> str:
    """OpenAI's reset format: ``1s``, ``6m0s``."""
    whole = max(1, math.ceil(seconds))
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Decision:
    """Whether a request may go on, and the headers that describe the key's limits."""

    allowed: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    error: errors.ErrorResponse | None = None


class KeyRateLimiter:
    """Per key RPM and TPM over Redis."""

    def __init__(self, redis_url: str):
        storage = RedisStorage(redis_url, key_prefix=keys.RATE_LIMIT_PREFIX)
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = SlidingWindowCounterRateLimiter(storage)

    def hit_request(self, key_id: str, rpm: int | None) -> Decision:
        """Count one request against the key's requests per minute."""
        if rpm is None:
            return Decision()
        item = RateLimitItemPerMinute(rpm)
        allowed = self._requests.hit(item, "rpm", key_id)
        stats = self._requests.get_window_stats(item, "rpm", key_id)
        reset = stats.reset_time - time.time()
        decision = Decision(allowed, {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(max(stats.remaining, 0)),
            "x-ratelimit-reset-requests": _reset(reset),
        })
        if not allowed:
            metrics.REJECTIONS.labels("rate_limit").inc()
            decision.error = errors.error(
                429, f"Rate limit reached for requests: {rpm} per minute. Try again in {_reset(reset)}.",
                "requests", "rate_limit_exceeded", retry_after=max(1, math.ceil(reset)))
        return decision

    def hit_tokens(self, key_id: str, tpm: int | None, tokens: int) -> Decision:
        """Charge a request's worst-case tokens against the key's tokens per minute."""
        if tpm is None:
            return Decision()
        item = RateLimitItemPerMinute(tpm)
        allowed = tokens <= tpm and self._tokens.hit(item, "tpm", key_id, cost=tokens)
        stats = self._tokens.get_window_stats(item, "tpm", key_id)
        reset = max(stats.reset_time - time.time(), 1.0)
        decision = Decision(allowed, {
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": str(max(stats.remaining, 0)),
            "x-ratelimit-reset-tokens": _reset(reset),
        })
        if not allowed:
            metrics.REJECTIONS.labels("token_limit").inc()
            decision.error = errors.error(
                429, f"Rate limit reached for tokens: {tpm} per minute; this request may use up to "
                f"{tokens}. Try again in {_reset(reset)}.", "tokens", "rate_limit_exceeded",
                retry_after=max(1, math.ceil(reset)))
        return decision


def _ip_breach(limit: RequestLimit) -> Response:
    retry = max(1, math.ceil(limit.reset_at - time.time()))
    metrics.REJECTIONS.labels("ip_limit").inc()
    return errors.to_response(errors.error(
        429, f"Too many requests from your address ({limit.limit}). Try again in {retry}s.",
        "requests", "rate_limit_exceeded", retry_after=retry))


def ip_limiter(app: Flask, settings: Settings) -> Limiter:
    """Flask-Limiter for per client IP limits (fails open if Redis is down)."""
    return Limiter(
        get_remote_address, app=app, storage_uri=settings.redis_url, strategy="moving-window",
        key_prefix=f"{keys.RATE_LIMIT_PREFIX}:ip", swallow_errors=True, on_breach=_ip_breach,
    )


def failed_auth_only(response: Response) -> bool:
    """Count only refused keys toward the brute-force limit."""
    return response.status_code == 401

