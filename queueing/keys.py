"""Every Redis key and channel name inferq uses, declared once.

Nothing else spells a key inline: API and workers meet on these names.
"""

from __future__ import annotations

PREFIX = "inferq"

#: Pub/sub channel on which the API asks every worker to abort a job.
CANCEL_CHANNEL = f"{PREFIX}:cancel"

#: Sorted set of live workers; member ``model\tworker_id``, score = heartbeat expiry.
LIVE_WORKERS = f"{PREFIX}:workers"

#: Hash: served model -> its model cards (JSON list, as vLLM's server lists them), kept by its workers.
MODEL_CARDS = f"{PREFIX}:model-cards"

#: Hash of running jobs: job id -> ``model\tworker_id``, kept by the job state machine,
#: so jobs orphaned by a dead worker can be found (``queueing.recovery``).
RUNNING_JOBS = f"{PREFIX}:running"

#: Stream of settled usage (one entry per finished job), drained into the SQL ledger.
USAGE_STREAM = f"{PREFIX}:usage"

#: Consumer group of the coordinators that drain :data:`USAGE_STREAM`.
USAGE_LEDGER_GROUP = "ledger"

#: Stream of finished batch lines: every terminal transition of a batch job appends the same
#: entry as to :data:`USAGE_STREAM` here too, for the coordinator's batch collector.
BATCH_LINES_STREAM = f"{PREFIX}:batch-lines"

#: Consumer group of the coordinators that collect :data:`BATCH_LINES_STREAM`.
BATCH_COLLECTOR_GROUP = "collector"

#: Stream of batch-line entries the collector could not record, each with why.
BATCH_LINES_DEAD_LETTERS = f"{PREFIX}:batch-lines:dead"

#: List the API pushes a batch id to when a batch needs its coordinator now (created,
#: cancelled); a coordinator blocks on it between its periodic passes.
BATCH_WAKE = f"{PREFIX}:batch-wake"

#: Sorted set of live coordinators; member ``host-pid``, score = heartbeat expiry (for ``inferq status``).
COORDINATORS = f"{PREFIX}:coordinators"

#: Stream of usage entries the ledger could not write (or whose hooks failed on them): each
#: is set aside here with why, acknowledged, and no longer blocks the drain.
USAGE_DEAD_LETTERS = f"{PREFIX}:usage:dead"

#: Prefix of the rate-limit counters (kept by the ``limits`` library).
RATE_LIMIT_PREFIX = f"{PREFIX}:limits"


def job(job_id: str) -> str:
    """Hash holding one job record (expires after ``JOB_TTL``)."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel carrying one job's token events."""
    return f"{PREFIX}:job:{job_id}:events"


def jobs_of(key_id: str) -> str:
    """Sorted set of one key's /v1/jobs jobs, scored by creation time."""
    return f"{PREFIX}:jobs-of:{key_id}"


def quota(key_id: str, day: str) -> str:
    """Hash ``{used, reserved}``: a key's tokens on one UTC day (expires after two days)."""
    return f"{PREFIX}:quota:{key_id}:{day}"


def model_queue(served_model: str) -> str:
    """Celery queue (a Redis list) of interactive work for one served model."""
    return f"{PREFIX}.{served_model}"


def batch_queue(served_model: str) -> str:
    """Celery queue of batch work (jobs, batch lines) for one served model."""
    return f"{PREFIX}.{served_model}.batch"


def running_entry(model: str, worker_id: str) -> str:
    """A :data:`RUNNING_JOBS` value (the same as the worker's :data:`LIVE_WORKERS` member)."""
    return f"{model}\t{worker_id}"


def worker_info(model: str, worker_id: str) -> str:
    """A worker's self-description (JSON, expiring with its heartbeat), for ``inferq status``."""
    return f"{PREFIX}:worker-info:{running_entry(model, worker_id)}"


def batch_dispatcher(batch_id: str) -> str:
    """Lease held (with a short expiry, renewed) by the coordinator dispatching a batch's lines."""
    return f"{PREFIX}:batch:{batch_id}:dispatcher"


def key_slots(key_id: str, kind: str) -> str:
    """Sorted set of what holds one of a key's ``kind`` slots (``queueing.key_limits``): job ids
    or long-poll ids, each scored by the time its slot lapses if nothing releases it."""
    return f"{PREFIX}:key:{key_id}:{kind}"


def key_pending_bytes(key_id: str) -> str:
    """Sorted set of a key's uploads being stored (``token:bytes``, scored by when the entry lapses)."""
    return f"{PREFIX}:key:{key_id}:pending-bytes"
