"""Managing API keys: create, list, revoke and update rows of ``api_keys``.

Only a key's SHA-256 hash and display prefix are stored; the key itself is
returned once, by :func:`create_key`. Keys are named by their public id
(``key_...``), their display prefix (``iq-AbC...``) or the key itself.
A bootstrap key (``API_KEYS``) is revoked by storing a revoked row with its hash
(:func:`revoke_key`), which every API process consults (``api.accounts.auth``).
The command line over this module is :mod:`api.accounts.keys_cli`.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.accounts.auth import BOOTSTRAP_ID_PREFIX, bootstrap_id, display_prefix, hash_key
from api.db import ApiKey, Database
from config import Settings
from config.settings import MIN_KEY_CHARS

KEY_PREFIX = "iq-"
PUBLIC_ID_PREFIX = "key_"
MAX_LIMIT = 2**31 - 1  # the SQL INTEGER columns
MAX_NAME_CHARS = 200  # api_keys.name
MAX_MODELS_CHARS = 2000  # api_keys.models, comma separated
DURATION_UNITS = {"m": dt.timedelta(minutes=1), "h": dt.timedelta(hours=1), "d": dt.timedelta(days=1),
                  "w": dt.timedelta(weeks=1)}
_DURATION = re.compile(r"^(\d+)([mhdw])$")


class KeyAdminError(ValueError):
    """A key operation that cannot be done; the message says why, for the operator."""


class UnknownKey(KeyAdminError):
    """No key matches the given id or prefix."""


class AmbiguousKey(KeyAdminError):
    """Several keys match the given prefix."""


class PlaceholderKeys(RuntimeError):
    """``ENV=production`` with placeholder or short bootstrap keys: the API must not start."""


class Keep(enum.Enum):
    """Marks a field that :func:`update_key` leaves as it is."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of a stored key (never the key or its hash); times are UTC."""

    public_id: str
    name: str
    prefix: str
    rpm: int | None
    tpm: int | None
    daily_tokens: int | None
    models: tuple[str, ...] | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        """The shown form of a row (SQLite hands back naive datetimes: they are UTC)."""
        return cls(public_id=row.public_id, name=row.name, prefix=row.prefix, rpm=row.rpm, tpm=row.tpm,
                   daily_tokens=row.daily_tokens, models=split_models(row.models),
                   created_at=_utc(row.created_at), last_used_at=_utc_or_none(row.last_used_at),
                   expires_at=_utc_or_none(row.expires_at), revoked_at=_utc_or_none(row.revoked_at))

    def status(self, now: dt.datetime | None = None) -> str:
        """``revoked``, ``expired`` or ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or _now()):
            return "expired"
        return "active"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: datetimes as ISO 8601, models as a list, plus ``status``."""
        out = {field.name: _json_value(getattr(self, field.name)) for field in fields(self)}
        out["status"] = self.status()
        return out


@dataclass(frozen=True)
class CreatedKey:
    """A new key: the secret, shown once, and what is stored about it."""

    key: str
    info: KeyInfo


@dataclass(frozen=True)
class KeyChanges:
    """The fields :func:`update_key` sets; ``None`` clears a limit, expiry or model list."""

    name: str | Keep = KEEP
    rpm: int | None | Keep = KEEP
    tpm: int | None | Keep = KEEP
    daily_tokens: int | None | Keep = KEEP
    models: tuple[str, ...] | None | Keep = KEEP
    expires_at: dt.datetime | None | Keep = KEEP

    def is_empty(self) -> bool:
        """True when nothing would change."""
        return all(getattr(self, f.name) is KEEP for f in fields(self))


# --- values ------------------------------------------------------------------


def generate_key() -> str:
    """A new random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_public_id() -> str:
    """A new public id, safe to show anywhere."""
    return PUBLIC_ID_PREFIX + secrets.token_hex(8)


def parse_expiry(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """When a key expires: a duration from now (``90m``, ``12h``, ``30d``, ``2w``), a date
    (``2027-01-31``: 00:00 UTC that day) or an ISO 8601 time (UTC unless it says otherwise)."""
    now = now or _now()
    value = text.strip()
    match = _DURATION.match(value.lower())
    if match:
        amount = int(match.group(1))
        if amount == 0:
            raise KeyAdminError(f"Expiry {text!r} is zero: give a positive duration.")
        try:
            return now + amount * DURATION_UNITS[match.group(2)]
        except OverflowError:
            raise KeyAdminError(f"Expiry {text!r} is too far in the future.") from None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise KeyAdminError(
            f"Cannot read expiry {text!r}: give a date (2027-01-31), a time (2027-01-31T12:00) or a "
            "duration from now (90m, 12h, 30d, 2w).") from None
    when = _utc(when)
    if when <= now:
        raise KeyAdminError(f"Expiry {text!r} is in the past.")
    return when


def parse_models(text: str) -> tuple[str, ...]:
    """A comma-separated model list, trimmed and deduplicated in order; never empty."""
    models = split_models(text)
    if not models:
        raise KeyAdminError(f"No model names in {text!r}: give them comma separated (m1,m2).")
    if len(",".join(models)) > MAX_MODELS_CHARS:
        raise KeyAdminError("The model list is too long to store.")
    return models


def split_models(text: str | None) -> tuple[str, ...] | None:
    """The stored comma-separated form back to names (``None``: every model)."""
    if text is None:
        return None
    return tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))


def join_models(models: tuple[str, ...] | None) -> str | None:
    """The stored form of a model list."""
    return ",".join(models) if models else None


def parse_limit(text: str) -> int:
    """A positive whole-number limit that fits the column."""
    try:
        value = int(text)
    except ValueError:
        raise KeyAdminError(f"{text!r} is not a whole number.") from None
    check_limit("the limit", value)
    return value


def check_limit(what: str, value: int | None) -> int | None:
    """``value`` if it is ``None`` (unlimited) or a positive limit that fits the column."""
    if value is not None and not 1 <= value <= MAX_LIMIT:
        raise KeyAdminError(f"{what} must be between 1 and {MAX_LIMIT} (or unlimited), not {value}.")
    return value


def check_name(name: str) -> str:
    """A trimmed, non-empty name that fits the column."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise KeyAdminError(f"A key's name must be 1 to {MAX_NAME_CHARS} characters.")
    return name


# --- operations ----------------------------------------------------------------


def create_key(db: Database, name: str, *, rpm: int | None = None, tpm: int | None = None,
               daily_tokens: int | None = None, models: tuple[str, ...] | None = None,
               expires_at: dt.datetime | None = None) -> CreatedKey:
    """Store a new key (its hash and prefix only) and return it, the one time it is known."""
    key = generate_key()
    row = ApiKey(public_id=new_public_id(), name=check_name(name), key_hash=hash_key(key),
                 prefix=display_prefix(key), rpm=check_limit("rpm", rpm), tpm=check_limit("tpm", tpm),
                 daily_tokens=check_limit("daily tokens", daily_tokens), models=join_models(models),
                 created_at=_now(), expires_at=expires_at)
    with db.sessions() as session:
        session.add(row)
        session.commit()
        return CreatedKey(key=key, info=KeyInfo.from_row(row))


def list_keys(db: Database) -> list[KeyInfo]:
    """Every stored key, oldest first (revoked and expired ones included)."""
    with db.sessions() as session:
        rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)).all()
        return [KeyInfo.from_row(row) for row in rows]


def get_key(db: Database, key_ref: str) -> KeyInfo:
    """The key named by ``key_ref`` (public id, display prefix or the key itself)."""
    with db.sessions() as session:
        return KeyInfo.from_row(_find(session, key_ref))


def revoke_key(db: Database, key_ref: str, bootstrap_keys: Sequence[str] = ()) -> tuple[KeyInfo, bool]:
    """Revoke a key at once; returns it and whether it was revoked now (not before).

    ``key_ref`` may also name one of ``bootstrap_keys`` (``API_KEYS``): by the key itself or its
    id (``bootstrap-...``), never by a prefix a stored key may share. A revoked row holding its
    hash is stored, and API processes refuse the key from then on
    (``api.accounts.auth.RevokedBootstrapKeys``).
    """
    bootstrap = _bootstrap_key(key_ref, bootstrap_keys)
    with db.sessions() as session:
        if bootstrap is not None:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(bootstrap))).first()
            if row is None:
                row = _bootstrap_row(bootstrap)
                session.add(row)
        else:
            row = _find(session, key_ref)
        if row.revoked_at is not None:
            return KeyInfo.from_row(row), False
        row.revoked_at = _now()
        session.commit()
        return KeyInfo.from_row(row), True


def check_bootstrap_keys(settings: Settings) -> str | None:
    """A warning for placeholder or short bootstrap keys (``None`` when there are none).

    Raises :class:`PlaceholderKeys` instead under ``ENV=production``.
    """
    weak = settings.placeholder_keys
    if not weak:
        return None
    what = (f"API_KEYS holds {len(weak)} placeholder or short key(s) (a documented placeholder such as "
            f"changeme or dev-key-1, or under {MIN_KEY_CHARS} characters)")
    if settings.env == "production":
        raise PlaceholderKeys(
            f"ENV=production: {what}; the API refuses to start. Replace them with random keys (e.g. "
            "iq-$(openssl rand -hex 24)), or store keys with `inferq keys create`.")
    return f"{what}: replace them before exposing this server (ENV=production refuses to start with them)"


def update_key(db: Database, key_ref: str, changes: KeyChanges) -> KeyInfo:
    """Change a key's name, limits, models or expiry; returns it as it now is."""
    with db.sessions() as session:
        row = _find(session, key_ref)
        if not isinstance(changes.name, Keep):
            row.name = check_name(changes.name)
        if not isinstance(changes.rpm, Keep):
            row.rpm = check_limit("rpm", changes.rpm)
        if not isinstance(changes.tpm, Keep):
            row.tpm = check_limit("tpm", changes.tpm)
        if not isinstance(changes.daily_tokens, Keep):
            row.daily_tokens = check_limit("daily tokens", changes.daily_tokens)
        if not isinstance(changes.models, Keep):
            row.models = join_models(changes.models)
        if not isinstance(changes.expires_at, Keep):
            row.expires_at = changes.expires_at
        session.commit()
        return KeyInfo.from_row(row)


def _bootstrap_key(key_ref: str, bootstrap_keys: Sequence[str]) -> str | None:
    """The bootstrap key ``key_ref`` names: the key itself or its id (``bootstrap-...``)."""
    ref = key_ref.strip()
    named = [key for key in bootstrap_keys if ref in (key, bootstrap_id(hash_key(key)))]
    if len(set(named)) > 1:
        raise AmbiguousKey(f"{len(named)} keys in API_KEYS have the id {ref!r}: give the key itself.")
    return named[0] if named else None


def _bootstrap_row(key: str) -> ApiKey:
    """The row that records a bootstrap key (for its revocation): its hash, never the key."""
    digest = hash_key(key)
    return ApiKey(public_id=bootstrap_id(digest), name="bootstrap key (API_KEYS)", key_hash=digest,
                  prefix=display_prefix(key), created_at=_now())


def _find(session: Session, key_ref: str) -> ApiKey:
    """The one row ``key_ref`` names, or :class:`UnknownKey` / :class:`AmbiguousKey`."""
    ref = key_ref.strip()
    if ref.startswith((PUBLIC_ID_PREFIX, BOOTSTRAP_ID_PREFIX)):
        row = session.scalars(select(ApiKey).where(ApiKey.public_id == ref)).first()
        if row is None:
            raise UnknownKey(f"No key with id {ref!r}: see `inferq keys list`.")
        return row
    shown = ref.removesuffix("...")
    if display_prefix(shown) == shown + "...":  # short enough to be a display prefix
        rows = session.scalars(select(ApiKey).where(ApiKey.prefix == shown + "...")).all()
        if len(rows) > 1:
            ids = ", ".join(r.public_id for r in rows)
            raise AmbiguousKey(f"{len(rows)} keys start with {shown}... ({ids}): name one by its id.")
        if rows:
            return rows[0]
    else:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(ref))).first()
        if row is not None:
            return row
    # Never echo what may be a whole key.
    shown_ref = ref if len(ref) <= len(display_prefix(ref)) else display_prefix(ref)
    raise UnknownKey(f"No key matches {shown_ref!r}: give a key id (key_...) or prefix "
                     "(iq-AbC...) from `inferq keys list`.")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _utc(when: dt.datetime) -> dt.datetime:
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return list(value) if isinstance(value, tuple) else value


def _utc_or_none(when: dt.datetime | None) -> dt.datetime | None:
    return None if when is None else _utc(when)
