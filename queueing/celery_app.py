"""The Celery application shared by the API (producer) and the workers.

The API never imports worker code: it sends tasks by name
(:data:`GENERATE_TASK`) to the queue of the requested model.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from config import Settings, get_settings, tracing
from queueing import keys

GENERATE_TASK = "inferq.generate"
GENERATE_BATCH_TASK = "inferq.generate_batch"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for long, late-acknowledged generation tasks."""
    app = Celery("inferq", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results travel over pub/sub and the job record
        task_acks_late=True,  # a killed worker's tasks are redelivered...
        task_reject_on_worker_lost=True,  # ...not acknowledged as done
        worker_prefetch_multiplier=1,  # one reserved task per slot
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=keys.model_queue(settings.served_model_name),
    )
    return app


app = make_celery(get_settings())


def enqueue_generation(
    celery: Celery, job_id: str, params: dict[str, Any], served_model: str, *, batch: bool = False,
    request_id: str | None = None,
) -> None:
    """Send one generation job to the interactive (or batch) queue of ``served_model``.

    The keyword arguments carry ``request_id`` (for the worker's log lines),
    ``enqueued_at`` (for its queue-wait metric) and ``trace`` (the W3C trace
    context of the current span, when tracing is on).
    """
    celery.send_task(
        GENERATE_BATCH_TASK if batch else GENERATE_TASK,
        args=[job_id, params],
        kwargs={"request_id": request_id, "enqueued_at": time.time(), "trace": tracing.current_carrier()},
        queue=keys.batch_queue(served_model) if batch else keys.model_queue(served_model),
        task_id=job_id,
    )
