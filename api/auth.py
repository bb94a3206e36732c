"""API-key authentication: ``Authorization: Bearer <key>`` or ``X-API-Key``.

Keys are known only by their SHA-256 hash (bootstrap keys from ``API_KEYS``
are hashed at start) and compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from flask import g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import errors, metrics
from api.db import ApiKey, Database
from api.extensions import services
from api.ratelimit import auth_gate

log = logging.getLogger(__name__)

LAST_USED_RESOLUTION = 60.0  # seconds


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """What logs and errors may show of a key."""
    return key[:6] + "..."


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id, name, prefix and limits, never the key itself.

    Limits that are ``None`` are unlimited; ``models`` ``None`` means every model.
    """

    key_id: str
    name: str
    prefix: str
    rpm: int | None = None
    tpm: int | None = None
    daily_tokens: int | None = None
    models: frozenset[str] | None = None

    def may_use(self, model: str) -> bool:
        """True when the key is not restricted away from ``model``."""
        return self.models is None or model in self.models

    @classmethod
    def from_row(cls, row: ApiKey) -> Principal:
        models = frozenset(m.strip() for m in row.models.split(",") if m.strip()) if row.models else None
        return cls(key_id=row.public_id, name=row.name, prefix=row.prefix, rpm=row.rpm, tpm=row.tpm,
                   daily_tokens=row.daily_tokens, models=models)


class KeyStore:
    """Looks up presented keys among bootstrap keys and the ``api_keys`` table."""

    def __init__(self, db: Database, bootstrap_keys: list[str]):
        self.db = db
        self._bootstrap = [(hash_key(k), display_prefix(k)) for k in bootstrap_keys]
        self._last_used_written: dict[str, float] = {}

    def verify(self, key: str) -> Principal | None:
        """The principal for ``key``, or ``None`` if it is unknown or revoked."""
        digest = hash_key(key)
        match = None
        for known, prefix in self._bootstrap:  # no early exit: constant time over the list
            if hmac.compare_digest(known, digest):
                match = Principal(key_id=f"bootstrap-{known[:8]}", name="bootstrap", prefix=prefix)
        if match:
            return match
        # Looked up on every request (an indexed read), so a revoked or expired
        # key is refused at once on every API host.
        with self.db.sessions() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
            if row is None or not hmac.compare_digest(row.key_hash, digest) or not _usable(row):
                return None
            self._touch(session, row)
            return Principal.from_row(row)

    def principal_for(self, key_id: str) -> Principal | None:
        """The principal of a key by its public id (for work that outlives its request),
        or ``None`` if the key is gone, revoked or expired."""
        for known, prefix in self._bootstrap:
            if key_id == f"bootstrap-{known[:8]}":
                return Principal(key_id=key_id, name="bootstrap", prefix=prefix)
        with self.db.sessions() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.public_id == key_id)).first()
            return Principal.from_row(row) if row is not None and _usable(row) else None

    def _touch(self, session: Session, row: ApiKey) -> None:
        """Record ``last_used_at``, at most once a minute per key and process."""
        now = time.monotonic()
        if now - self._last_used_written.get(row.public_id, -1e9) < LAST_USED_RESOLUTION:
            return
        self._last_used_written[row.public_id] = now
        row.last_used_at = dt.datetime.now(dt.UTC)
        session.commit()


def _usable(row: ApiKey) -> bool:
    if row.revoked_at is not None:
        return False
    if row.expires_at is None:
        return True
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=dt.UTC)
    return expires > dt.datetime.now(dt.UTC)


def presented_key() -> str | None:
    """The key in the request headers, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    """Reject the request with 401 unless it carries a valid key (429 once its address used
    up its budget of refused keys, ``api.ratelimit.AuthFailureGate``); sets ``g.principal``."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        key = presented_key()
        principal = services().keys.verify(key) if key is not None else None
        # The brute-force gate, in one Redis call: a refused key counts as a failure (or is
        # answered 429 once the address is blocked); a valid key only checks the block.
        blocked = auth_gate(refused=principal is None)
        if blocked is not None:
            return errors.to_response(blocked)
        if key is None:
            metrics.AUTH_FAILURES.labels("missing_key").inc()
            return errors.to_response(errors.error(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'.", "invalid_request_error", "missing_api_key"))
        if principal is None:
            log.info("rejected API key %s", display_prefix(key))
            metrics.AUTH_FAILURES.labels("invalid_key").inc()
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
