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
Flask-Limiter counts after the response, so parallel guesses all pass its check).
All counters live in Redis, so the limits hold across API processes and hosts.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import redis
from flask import Flask, Response, g
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address
from limits import RateLimitItemPerMinute, parse
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from api import errors, metrics
from config import Settings
from queueing import keys
from queueing.connections import get_redis

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

    def __init__(self, redis_url: str):
        self._storage = RedisStorage(redis_url, key_prefix=keys.RATE_LIMIT_PREFIX)
        self._requests = MovingWindowRateLimiter(self._storage)
        self._tokens = SlidingWindowCounterRateLimiter(self._storage)
        self._refund = get_redis(redis_url).register_script(_REFUND_TOKENS_LUA)

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
    back if the daily quota refuses the job (``api.gateway.Charge``).
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
        get_remote_address, app=app, storage_uri=settings.redis_url, strategy="moving-window",
        key_prefix=f"{keys.RATE_LIMIT_PREFIX}:ip", swallow_errors=True, on_breach=_ip_breach,
    )


AUTH_ATTEMPTS = f"{keys.RATE_LIMIT_PREFIX}:auth"
#: A slot never settled (its process died mid-request) frees itself after this many seconds.
PENDING_TTL = 30
#: How long an attempt waits for slots held by attempts whose key is still being checked.
BUSY_WAIT, BUSY_POLL = 2.0, 0.005

# KEYS[1]: the address's refused attempts, KEYS[2]: its attempts being checked (sorted sets,
# attempt id -> Redis server time). ARGV: window, pending TTL (seconds), limit, attempt id.
# Returns 1 (slot taken), -1 (busy: the free slots are held by attempts being checked),
# or 0 and the seconds until the oldest failure leaves the window (blocked).
_RESERVE_AUTH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
local failures = redis.call('ZCARD', KEYS[1])
if failures >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(1, math.ceil(tonumber(oldest[2] or now) + window - now))}
end
if failures + redis.call('ZCARD', KEYS[2]) >= limit then return {-1, 1} end
redis.call('ZADD', KEYS[2], now, ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {1, 0}
"""

# KEYS as above. ARGV: window, '1' if the key was refused, attempt id.
_SETTLE_AUTH_LUA = """
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 1
"""


class AuthFailureGate:
    """Brute-force protection: at most ``limit`` refused keys per client address and
    window, over every /v1 endpoint and every API process.

    Exact under concurrency: an attempt takes a slot before its key is checked and keeps
    it only if the key is refused. While the free slots are all held by attempts being
    checked (milliseconds each), further attempts wait for them rather than pass; once
    ``limit`` keys were refused the address gets 429 on /v1, valid keys included, until
    the oldest failure leaves the window. Fails open if Redis is unreachable.
    """

    def __init__(self, client: redis.Redis, limit: str):
        item = parse(limit)
        self.limit, self.window, self.text = item.amount, item.get_expiry(), limit
        self._reserve = client.register_script(_RESERVE_AUTH_LUA)
        self._settle = client.register_script(_SETTLE_AUTH_LUA)

    @staticmethod
    def _keys(address: str) -> list[str]:
        tag = f"{AUTH_ATTEMPTS}:{{{address}}}"  # one hash slot for both sets
        return [f"{tag}:refused", f"{tag}:checking"]

    def reserve(self, address: str) -> AuthAttempt | errors.ErrorResponse:
        """A slot for one attempt from ``address``, or the 429 that blocks it."""
        attempt_id = uuid.uuid4().hex
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            status, retry = self._reserve(keys=self._keys(address),
                                          args=[self.window, PENDING_TTL, self.limit, attempt_id])
            if status == 1:
                return AuthAttempt(self, address, attempt_id)
            if status == 0 or time.monotonic() >= deadline:
                break
            time.sleep(BUSY_POLL)
        metrics.REJECTIONS.labels("ip_limit").inc()
        return errors.error(
            429, f"Too many failed authentication attempts from your address ({self.text}). "
            f"Try again in {int(retry)}s.", "requests", "rate_limit_exceeded", retry_after=int(retry))

    def settle(self, attempt: AuthAttempt, refused: bool) -> None:
        """Free ``attempt``'s slot, or count it as a failure."""
        self._settle(keys=self._keys(attempt.address),
                     args=[self.window, "1" if refused else "0", attempt.id])


@dataclass
class AuthAttempt:
    """One request's slot in its address's brute-force budget, until its key is checked."""

    gate: AuthFailureGate
    address: str
    id: str
    settled: bool = False

    def settle(self, refused: bool) -> None:
        """Free the slot, or keep it as a failure if the key was refused (once; fails open)."""
        if self.settled:
            return
        self.settled = True
        try:
            self.gate.settle(self, refused)
        except redis.RedisError:
            log.warning("auth failure gate unavailable; attempt not settled")


def settle_auth_attempt(refused: bool) -> None:
    """Settle the current request's brute-force slot, if it holds one (``g.auth_attempt``)."""
    attempt: AuthAttempt | None = g.get("auth_attempt")
    if attempt is not None:
        attempt.settle(refused)

