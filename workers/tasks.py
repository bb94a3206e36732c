"""The Celery task that feeds a job to this process's engine."""

from __future__ import annotations

from typing import Any

from queueing.celery_app import GENERATE_TASK, app
from queueing.jobs import JobRequest
from workers import runtime
from workers.runner import INTERACTIVE


@app.task(name=GENERATE_TASK)
def generate(job_id: str, params: dict[str, Any], request_id: str | None = None,
             enqueued_at: float | None = None, trace: dict[str, str] | None = None) -> None:
    """Run one interactive generation job; the result travels over pub/sub and the job record.

    Batch work (``GENERATE_BATCH_TASK`` messages) is consumed by
    :class:`workers.batch_consumer.BatchConsumer`, not by Celery's pool.
    """
    runtime.current().runner.run(job_id, JobRequest.from_dict(params), INTERACTIVE,
                                 request_id=request_id, enqueued_at=enqueued_at, trace=trace)
