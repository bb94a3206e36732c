"""What revoking a key stops: its open batches, and its queued and running jobs (streams included).

``inferq keys revoke`` calls :func:`stop_work_of` after the key's row is revoked, from any
host that reaches SQL and Redis (not necessarily an API host: nothing here touches
``FILES_DIR``). Batches take the batch cancel path: an open batch turns ``cancelling``, and
its dispatched lines are cancelled here when its dispatch is done, else by its dispatcher,
which stops at its next look at the batch. A coordinator's collector or batch pass ends it
``cancelled``, with its output and error files, once its lines have settled. Jobs are swept
in Redis (:mod:`queueing.revocation`) twice, :data:`SETTLE_SECONDS` apart, for what a request
authenticated just before the revocation enqueued meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from sqlalchemy import select

from api.batches.lines import line_job_id
from api.batches.status import OPEN, BatchStatus
from api.batches.store import BatchStore
from api.db import Batch, Database
from config import Settings
from queueing import liveness
from queueing.revocation import cancel_jobs, cancel_jobs_of_key

log = logging.getLogger(__name__)

#: Seconds between the two sweeps: longer than a request takes from its key check to its enqueue.
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class Stopped:
    """What a revocation stopped."""

    batches: int
    jobs: int


def stop_work_of(settings: Settings, db: Database, client: redis.Redis, key_id: str,
                 settle: float = SETTLE_SECONDS) -> Stopped:
    """Cancel ``key_id``'s open batches and every job of it still queued or running."""
    batches = _cancel_batches(settings, BatchStore(db), client, key_id)
    cancelled = _sweep(settings, client, key_id)
    if settle > 0:
        time.sleep(settle)
        cancelled += _sweep(settings, client, key_id)
    log.warning("key %s revoked: %d batch(es) and %d job(s) cancelled", key_id, batches, cancelled)
    return Stopped(batches, cancelled)


def _cancel_batches(settings: Settings, store: BatchStore, client: redis.Redis, key_id: str) -> int:
    """Turn the key's open batches ``cancelling`` and cancel the lines of those fully dispatched."""
    open_statuses = [status.value for status in OPEN]
    with store.db.sessions() as session:
        open_ids = list(session.scalars(select(Batch.id).where(Batch.key_id == key_id,
                                                               Batch.status.in_(open_statuses))))
    stopped = 0
    for batch_id in open_ids:
        if not store.transition(batch_id, BatchStatus.CANCELLING):
            continue  # ended meanwhile
        stopped += 1
        batch = store.get(batch_id)
        if batch is not None and batch.dispatch_done:  # else its dispatcher cancels them as it stops
            cancel_jobs(client, [line_job_id(batch_id, seq) for seq in range(1, batch.dispatched + 1)],
                        settings.job_ttl)
    return stopped


def _sweep(settings: Settings, client: redis.Redis, key_id: str) -> int:
    models = {settings.served_model_name, *liveness.live_models(client)}
    return cancel_jobs_of_key(client, key_id, sorted(models), settings.job_ttl)
