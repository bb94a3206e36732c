"""The API's side of the queue: admit a job, enqueue it, and read its events.

The job's channel is subscribed (and confirmed) *before* the task is sent, so
no token can be published before anyone listens. Silence turns into a 504:
``QUEUE_TIMEOUT`` for the first event, ``IDLE_TIMEOUT`` between later ones;
either way the job is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from api import errors
from api.protocol import ErrorResponse
from config import Settings
from queueing import events, jobs, liveness
from queueing.celery_app import enqueue_generation
from queueing.channel import EventSubscription
from queueing.jobs import GenerationParams, JobRecord

log = logging.getLogger(__name__)


class JobStream:
    """A submitted job's events, ending with exactly one terminal event."""

    def __init__(self, gateway: Gateway, job_id: str, subscription: EventSubscription):
        self.gateway = gateway
        self.job_id = job_id
        self._subscription = subscription
        self._finished = False

    def __iter__(self) -> Iterator[events.TokenEvent]:
        first = True
        try:
            while not self._finished:
                s = self.gateway.settings
                timeout = s.queue_timeout if first else s.idle_timeout
                try:
                    event = self._subscription.next_event(timeout)
                except redis.RedisError:
                    log.exception("job %s: lost Redis while streaming", self.job_id)
                    event = events.Error("The queue became unavailable while streaming.", status=503,
                                         error_type="service_unavailable", code="queue_unavailable")
                if event is None:
                    event = self._deadline_error(first)
                self._finished = events.is_terminal(event)
                first = False
                yield event
        finally:
            self.close()

    def _deadline_error(self, first: bool) -> events.Error:
        what = "waiting in the queue" if first else "waiting for the next token"
        log.warning("job %s: deadline while %s; cancelling", self.job_id, what)
        self.cancel()
        return events.Error(f"The request timed out while {what}.", status=504,
                            error_type="timeout_error", code="timeout")

    def cancel(self) -> None:
        """Cancel the job (queued: never runs; running: aborted in the engine)."""
        try:
            jobs.request_cancel(self.gateway.redis, self.job_id, self.gateway.settings.job_ttl)
        except redis.RedisError:
            log.exception("job %s: could not cancel", self.job_id)

    def close(self) -> None:
        """Stop listening; a job that has not finished is cancelled (client went away)."""
        if not self._finished:
            self._finished = True
            self.cancel()
        self._subscription.close()


@dataclass
class Gateway:
    """Admission and enqueueing for one API process."""

    settings: Settings
    redis: redis.Redis
    celery: Celery

    def served_models(self) -> list[str]:
        """Models with at least one live worker."""
        return sorted(liveness.live_models(self.redis))

    def submit(self, params: GenerationParams) -> JobStream | ErrorResponse:
        """Enqueue a generation job, or say why it cannot run now."""
        try:
            live = liveness.live_models(self.redis)
            if params.model not in live:
                return self._no_worker(params.model)
            job_id = jobs.new_job_id()
            subscription = EventSubscription(self.redis, job_id)
            try:
                jobs.create(self.redis, JobRecord(id=job_id, params=params), self.settings.job_ttl)
                enqueue_generation(self.celery, job_id, params.to_dict(), params.model)
            except BaseException:
                subscription.close()
                raise
        except (redis.RedisError, OperationalError, OSError):
            log.exception("queue unavailable")
            return errors.unavailable("The queue is unavailable; try again shortly.",
                                      code="queue_unavailable")
        return JobStream(self, job_id, subscription)

    def _no_worker(self, model: str) -> ErrorResponse:
        if model == self.settings.served_model_name:
            return errors.unavailable(f"No live worker serves the model '{model}' right now.",
                                      retry_after=10, code="no_live_worker")
        return errors.error(404, f"The model '{model}' does not exist or is not served here.",
                            "invalid_request_error", "model_not_found", "model")
