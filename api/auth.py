"""API-key authentication: ``Authorization: Bearer <key>`` or ``X-API-Key``.

Keys are known only by their SHA-256 hash (bootstrap keys from ``API_KEYS``
are hashed at start) and compared in constant time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import g, request
from sqlalchemy import select

from api import errors
from api.db import ApiKey, Database
from api.extensions import services

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    """What logs and errors may show of a key."""
    return key[:6] + "..."


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name and prefix, never the key itself."""

    name: str
    prefix: str


class KeyStore:
    """Looks up presented keys among bootstrap keys and the ``api_keys`` table."""

    def __init__(self, db: Database, bootstrap_keys: list[str]):
        self.db = db
        self._bootstrap = [(hash_key(k), display_prefix(k)) for k in bootstrap_keys]

    def verify(self, key: str) -> Principal | None:
        """The principal for ``key``, or ``None`` if it is unknown or revoked."""
        digest = hash_key(key)
        match = None
        for known, prefix in self._bootstrap:  # no early exit: constant time over the list
            if hmac.compare_digest(known, digest):
                match = Principal(name="bootstrap", prefix=prefix)
        if match:
            return match
        with self.db.sessions() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return Principal(name=row.name, prefix=row.prefix)


def presented_key() -> str | None:
    """The key in the request headers, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def require_api_key(view: Callable[..., Any]) -> Callable[..., Any]:
    """Reject the request with 401 unless it carries a valid key; sets ``g.principal``."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        key = presented_key()
        if key is None:
            return errors.to_response(errors.error(
                401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' "
                "or 'X-API-Key: <key>'.", "invalid_request_error", "missing_api_key"))
        principal = services().keys.verify(key)
        if principal is None:
            log.info("rejected API key %s", display_prefix(key))
            return errors.to_response(errors.error(
                401, f"Incorrect API key provided: {display_prefix(key)}", "invalid_request_error",
                "invalid_api_key"))
        g.principal = principal
        return view(*args, **kwargs)

    return wrapped
