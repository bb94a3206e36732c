"""Rate limits: per key requests and tokens per minute, per client IP on the rest.

Per key limits are dynamic (each key has its own RPM/TPM) and need OpenAI's
``x-ratelimit-*-requests`` and ``-tokens`` headers on every response, so they
use the ``limits`` library (Flask-Limiter's engine) directly over Redis:

- requests per minute: a moving window (exact count of the last 60 s, one
  atomic Lua call per request);
- tokens per minute: a sliding-window counter, charged with the request's
  worst case as OpenAI does (a moving window would store one Redis entry per
  token). The gateway takes the charge (:class:`TokenCharge`) once the request
  passed every other check, just before the job is created, and gives it back
  if the daily quota refuses the job: refused requests cost no tokens.

Per IP limits on the probe endpoints are plain Flask-Limiter. Refused keys are
counted per client address by :class:`AuthFailureGate` (a Lua script, because
Flask-Limiter counts after the response, so parallel guesses would all pass its check).
All counters live in Redis, so the limits hold across API processes and hosts.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Flask, Response, current_app, request
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address
from limits import RateLimitItemPerMinute, parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from api.http import errors, metrics
from config import Settings
from queueing import keys
from queueing.connections import redis_client

log = logging.getLogger(__name__)


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

    def __init__(self, settings: Settings):
        self._storage = limits_storage(settings, key_prefix=keys.RATE_LIMIT_PREFIX)
        self._requests = MovingWindowRateLimiter(self._storage)
        self._tokens = SlidingWindowCounterRateLimiter(self._storage)
        self._refund = redis_client(settings).register_script(_REFUND_TOKENS_LUA)

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

    def refund_tokens(self, key_id: str, tpm: int, tokens: int) -> None:
        """Give back tokens that :meth:`hit_tokens` charged (the request never ran)."""
        key = RateLimitItemPerMinute(tpm).key_for("tpm", key_id)
        storage = self._storage
        self._refund(keys=[storage.prefixed_key(storage._previous_window_key(key)),
                           storage.prefixed_key(storage._current_window_key(key))], args=[tokens])


# KEYS[1], KEYS[2]: the previous and current window of limits' sliding-window counter.
# The tokens come back from the current window; what it lacks (the window turned over
# between the charge and the refund, a matter of milliseconds) from the previous one.
_REFUND_TOKENS_LUA = """
local amount = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local back = math.min(current, amount)
if back > 0 then redis.call('DECRBY', KEYS[2], back) end
local rest = math.min(amount - back, tonumber(redis.call('GET', KEYS[1]) or '0'))
if rest > 0 then redis.call('DECRBY', KEYS[1], rest) end
return back + rest
"""


class TokenCharge:
    """A request's worst case against its key's tokens per minute.

    The gateway takes it once the request passed every other check (model access,
    length, a live worker, queue depth), just before the job is created, and gives it
    back if the daily quota refuses the job (``api.generation.gateway.Charge``).
    """

    def __init__(self, limiter: KeyRateLimiter, key_id: str, tpm: int | None, tokens: int):
        self._limiter, self.key_id, self.tpm, self.tokens = limiter, key_id, tpm, tokens
        #: The ``x-ratelimit-*-tokens`` headers, once the charge was taken.
        self.headers: dict[str, str] = {}
        self._taken = False

    def take(self) -> errors.ErrorResponse | None:
        """Charge the tokens, or the 429 that says they do not fit this minute."""
        decision = self._limiter.hit_tokens(self.key_id, self.tpm, self.tokens)
        self.headers = decision.headers
        self._taken = decision.allowed and self.tpm is not None
        return decision.error

    def give_back(self) -> None:
        """Refund a charge taken for a job that was not created."""
        if not self._taken or self.tpm is None:
            return
        self._limiter.refund_tokens(self.key_id, self.tpm, self.tokens)
        self._taken = False
        remaining = int(self.headers["x-ratelimit-remaining-tokens"]) + self.tokens
        self.headers["x-ratelimit-remaining-tokens"] = str(min(remaining, self.tpm))


def _ip_breach(limit: RequestLimit) -> Response:
    retry = max(1, math.ceil(limit.reset_at - time.time()))
    metrics.REJECTIONS.labels("ip_limit").inc()
    return errors.to_response(errors.error(
        429, f"Too many requests from your address ({limit.limit}). Try again in {retry}s.",
        "requests", "rate_limit_exceeded", retry_after=retry))


def ip_limiter(app: Flask, settings: Settings) -> Limiter:
    """Flask-Limiter for per client IP limits (fails open if Redis is down)."""
    return Limiter(
        get_remote_address, app=app, storage_uri="redis://", storage_options=_pool_of(settings),
        strategy="moving-window", key_prefix=f"{keys.RATE_LIMIT_PREFIX}:ip", swallow_errors=True,
        on_breach=_ip_breach,
    )


def limits_storage(settings: Settings, key_prefix: str) -> RedisStorage:
    """The ``limits`` library's Redis storage over this process's pool (Sentinel-managed when
    ``REDIS_SENTINELS`` is set: limits gets the same primary, failover included)."""
    return RedisStorage("redis://", key_prefix=key_prefix, **_pool_of(settings))


def _pool_of(settings: Settings) -> dict[str, Any]:
    # limits reads raw replies: a pool that does not decode them.
    return {"connection_pool": redis_client(settings, decode_responses=False).connection_pool}


AUTH_ATTEMPTS = f"{keys.RATE_LIMIT_PREFIX}:auth"
#: Where :func:`create_app` puts the app's :class:`AuthFailureGate` (``app.extensions``).
AUTH_GATE = "inferq.auth_gate"

# One refused key. KEYS[1]: the address's refused attempts (a sorted set, attempt id -> Redis
# server time). ARGV: window (seconds), limit, a unique attempt id. Failures older than the
# window are dropped first; the key is then counted and {0, 0} returned, unless the address is
# blocked: then it is not counted and the script returns {1, seconds until enough failures
# left the window for fewer than ``limit`` to remain}.
_REFUSE_AUTH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local cutoff = string.format('%.6f', now - window)  -- failures at or before it are out
local function blocked()
  local count = redis.call('ZCOUNT', KEYS[1], '(' .. cutoff, '+inf')
  if count < limit then return nil end
  local freeing = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. cutoff, '+inf', 'WITHSCORES',
                             'LIMIT', count - limit, 1)
  return {1, math.max(1, math.ceil(tonumber(freeing[2]) + window - now))}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local verdict = blocked()
if verdict then return verdict end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(window))
return {0, 0}
"""


class AuthFailureGate:
    """Brute-force protection: at most ``limit`` refused keys per client address and
    window, over every /v1 endpoint and every API process.

    ``require_api_key`` checks the key first and calls the gate for a wrong key only: one
    atomic script adds it while the address has fewer than ``limit`` failures in the
    window, so parallel guesses get exactly ``limit`` 401s and 429 after that, until enough
    failures left the window. A missing key is not counted and a valid key never reaches the
    gate: it is served whatever its address did. Fails open (with a warning) if Redis is
    unreachable.
    """

    def __init__(self, client: redis.Redis, limit: str):
        item = parse(limit)
        self.limit, self.window, self.text = item.amount, item.get_expiry(), limit
        self._refuse = client.register_script(_REFUSE_AUTH_LUA)

    @staticmethod
    def key(address: str) -> str:
        """The address's refused attempts (hash-tagged by address: one cluster slot each)."""
        return f"{AUTH_ATTEMPTS}:{{{address}}}:refused"

    def refuse(self, address: str) -> errors.ErrorResponse | None:
        """Count a refused key from ``address``: ``None`` if it was counted (answer 401),
        or the 429 if the address was already blocked (it is not counted then)."""
        status, retry = self._refuse(keys=[self.key(address)],
                                     args=[self.window, self.limit, uuid.uuid4().hex])
        return self._too_many(int(retry)) if status else None

    def _too_many(self, retry: int) -> errors.ErrorResponse:
        metrics.REJECTIONS.labels("ip_limit").inc()
        return errors.error(
            429, f"Too many failed authentication attempts from your address ({self.text}). "
            f"Try again in {retry}s.", "requests", "rate_limit_exceeded", retry_after=retry)


def auth_gate() -> errors.ErrorResponse | None:
    """Count the current request's wrong key against its address (see
    :meth:`AuthFailureGate.refuse`): ``None`` if counted (answer 401), the 429 if the address
    is blocked. ``None`` too if the app has no gate or Redis is unreachable (fails open)."""
    gate: AuthFailureGate | None = current_app.extensions.get(AUTH_GATE)
    if gate is None:
        return None
    address = request.remote_addr or "unknown"
    try:
        return gate.refuse(address)
    except redis.RedisError:
        log.warning("auth failure gate unavailable; request let through")
        return None
