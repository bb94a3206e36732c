"""The services one API process holds, attached to the Flask app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from api.accounts.auth import KeyStore
    from api.accounts.ledger import Ledger
    from api.accounts.ratelimit import KeyRateLimiter
    from api.batches.runner import BatchRunner
    from api.db import Database
    from api.files.store import FileStore
    from api.generation.gateway import Gateway
    from config import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    keys: KeyStore
    gateway: Gateway
    ledger: Ledger
    rate_limits: KeyRateLimiter
    files: FileStore
    batches: BatchRunner


def services() -> Services:
    """The services of the current app."""
    return current_app.extensions["inferq"]
