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

#: Consumer group of the API processes that drain :data:`USAGE_STREAM`.
USAGE_LEDGER_GROUP = "ledger"

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


def batch_dispatcher(batch_id: str) -> str:
    """Lease held (with a short expiry, renewed) by the API process dispatching a batch's lines."""
    return f"{PREFIX}:batch:{batch_id}:dispatcher"
