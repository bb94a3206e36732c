"""The API's side of the queue: admit a job, enqueue it, and read its events.

The job's channel is subscribed (and confirmed) *before* the task is sent, so
no token can be published before anyone listens. Silence turns into a 504:
``QUEUE_TIMEOUT`` for the first event, ``IDLE_TIMEOUT`` between later ones;
either way the job is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from api.generation.job_request import length_error, worst_case_tokens
from api.generation.relay import Relay
from api.http import errors, metrics
from api.http.socket_writer import ChunkWriter
from api.protocol import ErrorResponse
from config import Settings, logs
from queueing import events, jobs, key_limits, keys, liveness, metering, recovery
from queueing.celery_app import enqueue_generation
from queueing.channel import EventSubscription
from queueing.jobs import JobRecord, JobRequest

log = logging.getLogger(__name__)


def _queue_unavailable() -> ErrorResponse:
    """503 for Redis or the broker failing (the cause goes to the log)."""
    log.exception("queue unavailable")
    return errors.unavailable("The queue is unavailable; try again shortly.", code="queue_unavailable")


#: The code of a batch line refused for its key's batch lines in flight (the dispatcher waits).
BATCH_LINES_FULL = "too_many_batch_lines"
#: Per-key caps a request may meet: the error code, what the key holds too many of, Retry-After.
_CAP_REFUSALS = {
    key_limits.Kind.STREAMS: ("too_many_concurrent_requests", "requests open at once (streams, buffered "
                              "requests and long-polls)", 1),
    key_limits.Kind.QUEUED: ("too_many_queued_jobs", "jobs waiting for a worker", 2),
    key_limits.Kind.BATCH_LINES: (BATCH_LINES_FULL, "batch lines in flight", 1),
}


def cap_reached(kind: key_limits.Kind, cap: int) -> ErrorResponse:
    """429 for a key that holds ``cap`` of ``kind`` already (OpenAI's rate-limit shape)."""
    code, what, retry = _CAP_REFUSALS[kind]
    if kind is not key_limits.Kind.BATCH_LINES:  # a batch line is not refused: its dispatcher waits
        metrics.REJECTIONS.labels(f"key_{kind.value.replace('-', '_')}").inc()
    return errors.error(429, f"This API key already has {cap} {what}, the most one key may have. "
                        "Try again when one of them has finished.", "requests", code, retry_after=retry)


def _give_back(charge: Charge | None) -> None:
    """Refund a per-minute charge for a job that will not run (best effort: Redis may be down)."""
    if charge is None:
        return
    try:
        charge.give_back()
    except redis.RedisError:
        log.warning("could not refund a per-minute token charge")


class Payer(Protocol):
    """Whose tokens a job spends (an authenticated key)."""

    @property
    def key_id(self) -> str: ...

    @property
    def daily_tokens(self) -> int | None: ...


class Charge(Protocol):
    """A per-minute charge (``api.accounts.ratelimit.TokenCharge``) taken just before a job is created,
    after every other check, and given back if the daily quota refuses the job."""

    def take(self) -> ErrorResponse | None: ...
    def give_back(self) -> None: ...


class JobStream:
    """A submitted job's events, ending with exactly one terminal event."""

    def __init__(self, gateway: Gateway, job_id: str, model: str, subscription: EventSubscription):
        self.gateway = gateway
        self.job_id = job_id
        self.model = model
        self._subscription = subscription
        self._received: deque[events.TokenEvent] = deque()  # read from the subscription, not yet yielded
        self._finished = False
        self._completion_tokens = 0  # streamed so far: what a job whose worker died settles to
        self._relay: Relay | None = None  # deltas written from the subscriber's reader (relay_to)
        #: Checked while waiting: True once the client has hung up (the job is then cancelled).
        self.client_gone: Callable[[], bool] = lambda: False

    def __iter__(self) -> Iterator[events.TokenEvent]:
        first = True
        try:
            while not self._finished:
                s = self.gateway.settings
                try:
                    event = self._next(s.queue_timeout if first else s.idle_timeout)
                except redis.RedisError:
                    log.exception("job %s: lost Redis while streaming", self.job_id)
                    event = events.Error("The queue became unavailable while streaming.", status=503,
                                         error_type="service_unavailable", code="queue_unavailable")
                if event is None:
                    event = self._deadline_error(first)
                self._finished = events.is_terminal(event)
                if isinstance(event, events.Delta):
                    self._completion_tokens += event.tokens
                first = False
                yield event
        finally:
            self.close()

    def relay_to(self, writer: ChunkWriter) -> None:
        """From now on, write deltas to the client from the subscriber's reader
        (:mod:`api.generation.relay`); this iterator then yields only the rest."""
        if self._relay is None and not self._finished:
            metrics.STREAM_RELAY.labels("relayed").inc()
            self._relay = Relay(self._subscription, writer)
            if not self._received:
                self._relay.resume()

    def _next(self, timeout: float) -> events.TokenEvent | None:
        """The next event within ``timeout``; between heartbeats, check the job's worker is alive."""
        if self._received:
            return self._pop()
        relay = self._relay
        deadline = time.monotonic() + timeout
        step = self.gateway.settings.worker_heartbeat_interval
        while (left := deadline - time.monotonic()) > 0:
            relayed = 0
            if relay is not None:
                relay.catch_up()  # the client's failure is raised here, as a write of ours would
                if not relay.on:
                    received = self._subscription.next_events(0)
                    if received:  # queued while the relay was off: they go out the usual way
                        self._received.extend(received)
                        return self._pop()
                    relay.resume()
                relayed = relay.deltas
            received = self._subscription.next_events(min(step, left))  # all that arrived: one wake-up
            if received:
                self._received.extend(received)
                return self._pop()
            if relay is not None and (not relay.on or relay.deltas != relayed):
                if relay.deltas != relayed:  # tokens flowed past this greenlet: not idle
                    deadline = time.monotonic() + timeout
                continue
            if self._worker_lost():
                return self._lost_error()
            if self.client_gone():
                log.info("job %s: the client hung up while waiting; cancelling", self.job_id)
                self.cancel()
                return events.Cancelled()
        return None

    def _pop(self) -> events.TokenEvent:
        """The next received event; deltas received together become one (one write to the client)."""
        received = self._received
        event = received.popleft()
        if isinstance(event, events.Delta) and received and isinstance(received[0], events.Delta):
            frames, tokens = [event.frames], event.tokens
            while received and isinstance(received[0], events.Delta):
                more = received.popleft()
                assert isinstance(more, events.Delta)
                frames.append(more.frames)
                tokens += more.tokens
            event = events.Delta(b"".join(frames), tokens)
        return event

    def _worker_lost(self) -> bool:
        status, worker = self.gateway.redis.hmget(keys.job(self.job_id), "status", "worker")
        return status == jobs.JobStatus.RUNNING and bool(worker) and not liveness.is_alive(
            self.gateway.redis, self.model, str(worker))

    def _lost_error(self) -> events.Error:
        """Fail the job whose worker died (if it ended after all, its own event is on the channel)."""
        log.warning("job %s: its worker stopped sending heartbeats; failing it", self.job_id)
        gateway = self.gateway
        streamed = self._completion_tokens + (self._relay.tokens if self._relay is not None else 0)
        recovery.fail_running(gateway.redis, self.job_id, recovery.WORKER_LOST, gateway.settings.job_ttl,
                              completion_tokens=streamed)
        return recovery.WORKER_LOST

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
        if self._relay is not None:
            self._relay.stop()
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
    #: Tokens the durable ledger holds for (key_id, day): rebuilds a lost quota counter.
    used_on: Callable[[str, str], int] = lambda key_id, day: 0

    def served_models(self) -> list[str]:
        """Models with at least one live worker."""
        return sorted(liveness.live_models(self.redis))

    def model_cards(self, models: list[str]) -> list[dict[str, Any]]:
        """The cards of ``models`` as their workers' vLLM lists them (``/v1/models``)."""
        cards = liveness.model_cards(self.redis, models)
        return [card for model in models for card in cards.get(model, [])]

    def submit(self, request: JobRequest, payer: Payer | None = None,
               charge: Charge | None = None) -> JobStream | ErrorResponse:
        """Reserve the request's worst case against the payer's quota and enqueue it,
        or say why it cannot run now."""
        record = self.new_record(request, payer)
        try:
            # Subscribed before the job exists; Redis confirms while the admission round trip runs.
            pending = EventSubscription.start(self.redis, record.id)
            try:
                refused = self._refusal(request)
                if refused is not None:
                    pending.close()
                    return refused
                subscription = pending.confirmed()
            except BaseException:
                pending.close()
                raise
            try:
                quota_error = self._create(record, charge=charge)
            except BaseException:
                subscription.close()
                raise
            if quota_error is not None:
                subscription.close()
                return quota_error
            try:
                enqueue_generation(self.celery, record.id, request.to_dict(), request.model,
                                   request_id=logs.request_id.get())
            except BaseException:
                subscription.close()
                self._abandon(record.id, charge)
                raise
        except (redis.RedisError, OperationalError, OSError):
            return _queue_unavailable()
        return JobStream(self, record.id, request.model, subscription)

    def _refusal(self, request: JobRequest) -> ErrorResponse | None:
        """Why ``request`` cannot be queued now (no live worker, too long, queue full), if so."""
        live, waiting = self._admission_state(request.model)
        if not live:
            return self._no_worker(request.model)
        too_long = length_error(request, self.settings.max_model_len)
        if too_long is not None:
            return too_long
        if 0 < self.settings.max_queue_depth <= waiting:
            metrics.REJECTIONS.labels("queue_full").inc()
            return errors.unavailable(
                f"Too many requests are waiting for the model '{request.model}'; try again shortly.",
                retry_after=2, code="queue_full")
        return None

    def submit_job(self, request: JobRequest, payer: Payer, endpoint: str,
                   metadata: str | None, charge: Charge | None = None) -> JobRecord | ErrorResponse:
        """Enqueue a job on the batch queue (no one listens to its events); it is
        listed among the payer's jobs."""
        record = self.new_record(request, payer)
        record.endpoint, record.metadata = endpoint, metadata
        # enqueue_batch refuses another model without a live worker itself (404), but after its
        # length check, and accepts the API's own model without one (a batch waits for it). Ask
        # here in those two cases only, so a job gets 503 for the own model, and 404 rather than
        # 400 for another, as direct requests do.
        if (request.model == self.settings.served_model_name
                or length_error(request, self.settings.max_model_len) is not None):
            try:
                if request.model not in liveness.live_models(self.redis):
                    return self._no_worker(request.model)
            except redis.RedisError:
                return _queue_unavailable()
        return self.enqueue_batch(record, index=keys.jobs_of(payer.key_id), charge=charge)

    def enqueue_batch(self, record: JobRecord, index: str | None = None,
                      charge: Charge | None = None) -> JobRecord | ErrorResponse:
        """Reserve and enqueue a prepared record on the batch queue.

        Idempotent per job id: a record that exists already (a batch resumed after its
        dispatcher died) reserves nothing again; it is enqueued again only while still
        queued (its first message may never have been sent; a duplicate runs once).
        A model that is not this API's and that no live worker serves is refused (404): its
        queue would have no consumer, and its messages would wait there forever.
        """
        request = record.request
        too_long = length_error(request, self.settings.max_model_len)
        if too_long is not None:
            return too_long
        try:
            if (request.model != self.settings.served_model_name
                    and request.model not in liveness.live_models(self.redis)):
                return self._no_worker(request.model)
            try:
                quota_error = self._create(record, index=index, charge=charge)
            except jobs.JobExists:
                existing = jobs.get(self.redis, record.id)
                if existing is None or existing.status is not jobs.JobStatus.QUEUED:
                    return existing or record
                quota_error = None
            if quota_error is not None:
                return quota_error
            try:
                enqueue_generation(self.celery, record.id, request.to_dict(), request.model, batch=True,
                                   request_id=logs.request_id.get())
            except BaseException:
                self._abandon(record.id, charge)
                raise
        except (redis.RedisError, OperationalError, OSError):
            return _queue_unavailable()
        return record

    def new_record(self, request: JobRequest, payer: Payer | None,
                   job_id: str | None = None) -> JobRecord:
        """A job record for ``request``, charged to ``payer`` (with its worst case to reserve)."""
        record = JobRecord(id=job_id or jobs.new_job_id(), request=request)
        if payer is not None:
            day = metering.quota_day()
            record.key_id = payer.key_id
            record.quota_day = day
            if payer.daily_tokens is not None:
                record.quota_key = keys.quota(payer.key_id, day)
                record.quota_limit = payer.daily_tokens
                record.reserved_tokens = worst_case_tokens(request, self.settings.max_model_len)
        return record

    def _create(self, record: JobRecord, index: str | None = None,
                charge: Charge | None = None) -> ErrorResponse | None:
        if charge is not None and (refused := charge.take()) is not None:
            return refused
        ttl = self.settings.job_ttl
        caps = key_limits.assign(record, key_limits.KeyLimits.from_settings(self.settings))
        try:
            try:
                jobs.create(self.redis, record, ttl, index=index, caps=caps)
            except jobs.QuotaUnseeded:
                assert record.key_id and record.quota_day
                jobs.create(self.redis, record, ttl, index=index, caps=caps,
                            seed_used=self.used_on(record.key_id, record.quota_day))
        except jobs.CapReached as full:
            _give_back(charge)
            return cap_reached(key_limits.kind_of(full.slot), full.cap)
        except jobs.QuotaExceeded as exc:
            log.info("quota: key %s refused %d tokens (%d used, %d reserved of %d)",
                     record.key_id, record.reserved_tokens, exc.used, exc.reserved, exc.limit)
            metrics.REJECTIONS.labels("quota").inc()
            _give_back(charge)
            return errors.error(
                429, f"This request needs up to {record.reserved_tokens} tokens, which would exceed your "
                f"daily quota of {exc.limit} tokens ({exc.used} used, {exc.reserved} held by requests "
                "in flight).", "insufficient_quota", "quota_exceeded",
                retry_after=metering.seconds_until_next_day())
        except BaseException:  # no job was created (Redis failed, or it exists): no charge either
            _give_back(charge)
            raise
        return None

    def _abandon(self, job_id: str, charge: Charge | None = None) -> None:
        """Fail a job that could not be enqueued, releasing its reservation and its per-minute charge."""
        _give_back(charge)
        try:
            jobs.transition(self.redis, job_id, jobs.JobStatus.FAILED, self.settings.job_ttl,
                            only_from=jobs.JobStatus.QUEUED, finished_at=time.time(),
                            prompt_tokens=0, completion_tokens=0, error="not enqueued")
        except (jobs.TransitionRefused, redis.RedisError):
            log.warning("job %s: could not release its reservation", job_id)

    def _admission_state(self, model: str) -> tuple[bool, int]:
        """Whether ``model`` has a live worker, and how many interactive requests wait for it
        (one round trip).

        The depth is checked, then the job enqueued: concurrent API processes may
        overshoot ``MAX_QUEUE_DEPTH`` by the requests admitted in the same instant.
        """
        pipe = self.redis.pipeline(transaction=False)
        liveness.query_live(pipe)
        pipe.llen(keys.model_queue(model))
        members, waiting = pipe.execute()
        return model in liveness.count_models(members), int(waiting)

    def _no_worker(self, model: str) -> ErrorResponse:
        if model == self.settings.served_model_name:
            metrics.REJECTIONS.labels("no_worker").inc()
            return errors.unavailable(f"No live worker serves the model '{model}' right now.",
                                      retry_after=10, code="no_live_worker")
        return errors.error(404, f"The model '{model}' does not exist or you do not have access to it.",
                            "invalid_request_error", "model_not_found", "model")
