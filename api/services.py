"""Builds the services one process holds over SQL and Redis: the API's and a coordinator's."""

from __future__ import annotations

from api.accounts.auth import KeyStore
from api.accounts.ledger import Ledger
from api.accounts.ratelimit import KeyRateLimiter
from api.batches.collector import BatchCollector
from api.batches.runner import BatchRunner
from api.batches.store import BatchStore
from api.db import Database
from api.extensions import Services
from api.files.store import FileStore
from api.generation.gateway import Gateway
from config import Settings
from queueing.celery_app import make_celery
from queueing.connections import redis_client


def build_services(settings: Settings) -> Services:
    """Every service, wired through constructors (creates the SQL schema if it is missing)."""
    db = Database(settings)
    db.create_schema()
    client = redis_client(settings)
    key_store = KeyStore(db, settings.bootstrap_keys)
    files = FileStore(db, settings)
    batch_store = BatchStore(db)
    ledger = Ledger(client, db)
    gateway = Gateway(settings, client, make_celery(settings), used_on=ledger.used_on)
    collector = BatchCollector.for_store(batch_store, files, client)
    runner = BatchRunner(batch_store, files, gateway, collector, key_store.principal_for)
    return Services(settings, db, key_store, gateway, ledger, KeyRateLimiter(settings), files, runner)
