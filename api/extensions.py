"""The services one API process holds, attached to the Flask app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from api.auth import KeyStore
    from api.batch_runner import BatchRunner
    from api.db import Database
    from api.files import FileStore
    from api.gateway import Gateway
    from api.ledger import Ledger
    from api.ratelimit import KeyRateLimiter
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
