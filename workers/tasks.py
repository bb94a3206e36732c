"""The Celery task that feeds a job to this process's engine, registered on the worker's app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery

from queueing.celery_app import GENERATE_TASK
from queueing.jobs import JobRequest
from workers.runner import INTERACTIVE

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime


def register(app: Celery, runtime: WorkerRuntime) -> None:
    """Register the interactive generation task (:data:`GENERATE_TASK`) on ``app``, run by ``runtime``.

    Batch work (``GENERATE_BATCH_TASK`` messages) is consumed by
    :class:`workers.batch_consumer.BatchConsumer`, not by Celery's pool.
    """

    @app.task(name=GENERATE_TASK, shared=False)
    def generate(job_id: str, params: dict[str, Any], request_id: str | None = None,
                 enqueued_at: float | None = None, trace: dict[str, str] | None = None) -> None:
        """Run one interactive generation job; the result travels over pub/sub and the job record."""
        runtime.runner.run(job_id, JobRequest.from_dict(params), INTERACTIVE,
                           request_id=request_id, enqueued_at=enqueued_at, trace=trace)
