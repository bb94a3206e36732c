"""Every Redis key and channel name inferq uses, declared once.

Nothing else spells a key inline: API and workers meet on these names.
"""

from __future__ import annotations

PREFIX = "inferq"

#: Pub/sub channel on which the API asks every worker to abort a job.
CANCEL_CHANNEL = f"{PREFIX}:cancel"

#: Sorted set of live workers; member ``model\tworker_id``, score = heartbeat expiry.
LIVE_WORKERS = f"{PREFIX}:workers"


def job(job_id: str) -> str:
    """Hash holding one job record (expires after ``JOB_TTL``)."""
    return f"{PREFIX}:job:{job_id}"


def job_events(job_id: str) -> str:
    """Pub/sub channel carrying one job's token events."""
    return f"{PREFIX}:job:{job_id}:events"


def model_queue(served_model: str) -> str:
    """Celery queue (a Redis list) of interactive work for one served model."""
    return f"{PREFIX}.{served_model}"
