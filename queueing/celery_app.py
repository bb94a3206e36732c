"""How inferq's Celery apps are built, and how generation jobs are sent.

There is no module-level app: the API (producer) and the worker each build theirs
with :func:`make_celery` from their settings, and Flower loads
:mod:`queueing.flower_app`. The API never imports worker code: it sends tasks by
name (:data:`GENERATE_TASK`) to the queue of the requested model.
"""

from __future__ import annotations

import math
import time
from typing import Any

from celery import Celery

from config import Settings, tracing
from queueing import broker_transport, keys
from queueing.connections import broker_settings, broker_tls

GENERATE_TASK = "inferq.generate"
GENERATE_BATCH_TASK = "inferq.generate_batch"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for long, late-acknowledged generation tasks (its broker: the
    one Redis at ``REDIS_URL``, or the sentinels' primary, see :func:`broker_settings`)."""
    broker_transport.install()  # kombu's Redis transports, one client per channel
    broker_url, transport_options = broker_settings(settings)
    app = Celery("inferq", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results travel over pub/sub and the job record
        task_acks_late=True,  # a killed worker's tasks are redelivered...
        task_reject_on_worker_lost=True,  # ...not acknowledged as done
        worker_prefetch_multiplier=1,  # one reserved task per slot
        broker_transport_options={"visibility_timeout": settings.visibility_timeout, **transport_options},
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy=_publish_retry_policy(settings),
        worker_hijack_root_logger=False,
        task_default_queue=keys.model_queue(settings.served_model_name),
    )
    tls = broker_tls(settings)
    if tls is not None:  # rediss://: verify the server (kombu alone would not), for Flower too
        app.conf.broker_use_ssl = tls
    return app


def _publish_retry_policy(settings: Settings) -> dict[str, float]:
    """Celery's own (about a second of retries), or with sentinels one that outlasts a failover:
    a message sent while the sentinels promote a replica goes to the new primary."""
    if not settings.redis_sentinels.strip():
        return {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}
    return {"max_retries": math.ceil(settings.redis_failover_timeout / 0.5), "interval_start": 0,
            "interval_step": 0.25, "interval_max": 0.5}


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
        # Shown by Flower and the worker's log instead of the arguments: the job id, never the
        # prompt (and Celery's safe repr of a long prompt cost more than sending it).
        argsrepr=f"[{job_id!r}, ...]", kwargsrepr=f"{{'request_id': {request_id!r}, ...}}",
        ignore_result=True, add_to_parent=False, reply_to="inferq", result_cls=SentTask,
    )


class SentTask:
    """What ``send_task`` returns here: Celery's ``AsyncResult`` would build a result backend
    for each greenlet (Celery keeps one per thread) that nobody asks."""

    __slots__ = ("id", "ignored")

    def __init__(self, task_id: str):
        self.id = task_id
        self.ignored = True
