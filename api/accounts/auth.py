"""API keys: who a key is (:class:`Principal`), looked up by its hash (:class:`KeyStore`).

The decorator that authenticates a request is :mod:`api.accounts.guard`'s. Keys are known
only by their SHA-256 hash (bootstrap keys from ``API_KEYS`` are hashed at start) and
compared in constant time. A bootstrap key is revoked like a stored one (``inferq keys
revoke``): a revoked row holding its hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.db import ApiKey, Database

log = logging.getLogger(__name__)

LAST_USED_RESOLUTION = 60.0  # seconds
#: Seconds a process trusts its list of revoked bootstrap keys before reading it again.
BOOTSTRAP_REVOCATION_REFRESH = 1.0
BOOTSTRAP_ID_PREFIX = "bootstrap-"


def bootstrap_id(digest: str) -> str:
    """The public id of the bootstrap key whose hash is ``digest``."""
    return f"{BOOTSTRAP_ID_PREFIX}{digest[:8]}"


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
        self._revoked = RevokedBootstrapKeys(db, [known for known, _ in self._bootstrap])

    def verify(self, key: str) -> Principal | None:
        """The principal for ``key``, or ``None`` if it is unknown or revoked."""
        digest = hash_key(key)
        match = None
        for known, prefix in self._bootstrap:  # no early exit: constant time over the list
            if hmac.compare_digest(known, digest):
                match = Principal(key_id=bootstrap_id(known), name="bootstrap", prefix=prefix)
        if match:
            return None if self._revoked.holds(digest) else match
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
            if key_id == bootstrap_id(known):
                return None if self._revoked.holds(known) else Principal(key_id=key_id, name="bootstrap",
                                                                         prefix=prefix)
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


class RevokedBootstrapKeys:
    """Which bootstrap keys are revoked: rows of ``api_keys`` holding their hash with ``revoked_at``
    set (``inferq keys revoke``), read again at most once a second.

    A bootstrap request thus costs no SQL read in between, and a revocation reaches every API
    process within :data:`BOOTSTRAP_REVOCATION_REFRESH`. While SQL is unreachable the list last
    read stands (bootstrap keys keep working, as they did before they could be revoked).
    """

    def __init__(self, db: Database, digests: list[str]):
        self.db = db
        self.digests = digests
        self._revoked: frozenset[str] = frozenset()
        self._read_at = -1e9

    def holds(self, digest: str) -> bool:
        """Whether the bootstrap key hashed ``digest`` is revoked."""
        if time.monotonic() - self._read_at >= BOOTSTRAP_REVOCATION_REFRESH:
            self._read_at = time.monotonic()
            try:
                with self.db.sessions() as session:
                    self._revoked = frozenset(session.scalars(select(ApiKey.key_hash).where(
                        ApiKey.key_hash.in_(self.digests), ApiKey.revoked_at.is_not(None))))
            except SQLAlchemyError:
                log.warning("could not read revoked bootstrap keys; using the list read before",
                            exc_info=True)
        return digest in self._revoked


def _usable(row: ApiKey) -> bool:
    if row.revoked_at is not None:
        return False
    if row.expires_at is None:
        return True
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=dt.UTC)
    return expires > dt.datetime.now(dt.UTC)
