"""Runs one job: engine events in, job transitions and pub/sub events out."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import redis

from config import Settings, get_settings, logs, tracing
from queueing import channel, events, jobs, metering, replication
from queueing.jobs import JobRequest, JobStatus, TransitionRefused
from workers import metrics
from workers.engine import AdmitCallback, Engine
from workers.publisher import DeltaPublisher
from workers.vllm_response import ENGINE_FAILURE

log = logging.getLogger(__name__)

_STATUS_OF = {
    events.Done: JobStatus.SUCCEEDED,
    events.Error: JobStatus.FAILED,
    events.Cancelled: JobStatus.CANCELLED,
}

INTERACTIVE, BATCH = 0, 1  # engine priorities: lower runs first

QUOTA_EXCEEDED = events.Error(
    message="This request would exceed your daily token quota.",
    status=429,
    error_type="insufficient_quota",
    code="quota_exceeded",
)



@dataclasses.dataclass
class _Progress:
    """What a running job has consumed so far (its usage if it fails mid-way)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def usage(self) -> events.Usage:
        return events.Usage(self.prompt_tokens, self.completion_tokens)


class JobRunner:
    """Wires an engine to Redis for one worker process (thread-safe)."""

    def __init__(self, engine: Engine, client: redis.Redis, worker_id: str, job_ttl: int,
                 settings: Settings | None = None):
        self.engine = engine
        self.redis = client
        self.settings = settings or get_settings()  # REDIS_WAIT_* for a job's end (finish)
        self.worker_id = worker_id
        self.job_ttl = job_ttl
        self.publisher = DeltaPublisher(client, on_failure=engine.abort)
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._cancel_pending: set[str] = set()

    def cancel(self, job_id: str) -> bool:
        """Abort ``job_id`` if this worker runs it; False if it is not running here.

        A cancel may arrive after the job turned RUNNING but before the engine has
        registered the request; it is then kept and applied as soon as the engine has it.
        """
        if self.engine.abort(job_id):
            return True
        with self._lock:
            if job_id not in self._active:
                return False
            self._cancel_pending.add(job_id)
        if self.engine.abort(job_id):  # registered meanwhile, perhaps after the runner looked
            with self._lock:
                self._cancel_pending.discard(job_id)
        return True

    def run(self, job_id: str, request: JobRequest, priority: int = INTERACTIVE,
            request_id: str | None = None, enqueued_at: float | None = None,
            trace: dict[str, str] | None = None) -> None:
        """Generate for ``job_id``, publishing deltas and exactly one terminal event.

        ``request_id`` (the API request that made the job) tags this job's log lines;
        ``enqueued_at`` (epoch seconds) measures its queue wait; ``trace`` is the
        submitting request's trace context (the job's span joins that trace).
        """
        logs.request_id.set(request_id or "-")
        logs.job_id.set(job_id)
        kind = metrics.PRIORITY_NAMES[priority]
        started = time.time()
        span = tracing.Span("inferq.job", trace, {"inferq.job_id": job_id, "inferq.priority": kind})
        try:
            self._run(job_id, request, priority, kind, started, enqueued_at, span)
        finally:
            span.end()

    def _run(self, job_id: str, request: JobRequest, priority: int, kind: str, started: float,
             enqueued_at: float | None, span: tracing.Span) -> None:
        # Active before RUNNING: a cancel that sees the job running must find it here.
        with self._lock:
            self._active.add(job_id)
        try:
            jobs.transition(
                self.redis, job_id, JobStatus.RUNNING, self.job_ttl, model=request.model,
                started_at=time.time(), worker=self.worker_id,
            )
        except TransitionRefused as refused:
            self._forget(job_id)
            # Cancelled while queued, expired, or a redelivery of a finished job.
            log.info("job %s not started: %s", job_id, refused)
            metrics.JOBS.labels(kind, "refused").inc()
            span.set({"inferq.outcome": "refused"})
            if refused.current is JobStatus.CANCELLED:
                channel.publish(self.redis, job_id, events.Cancelled())
            return
        except BaseException:
            self._forget(job_id)
            raise
        if enqueued_at is not None:
            metrics.QUEUE_WAIT.labels(kind).observe(max(started - enqueued_at, 0.0))
        active = metrics.ACTIVE_JOBS.labels(kind)
        active.inc()
        progress = _Progress()
        terminal: events.TerminalEvent | None = None
        publisher = self.publisher

        def emit(delta: events.Delta) -> None:  # on the engine's thread: count, and queue for Redis
            progress.completion_tokens += delta.tokens
            publisher.send(job_id, delta)

        try:
            answer = self.engine.stream(job_id, request, emit, admit=self._admission(job_id, progress),
                                        priority=priority)
            self._apply_pending_cancel(job_id)  # the engine knows the request from here on
            for event in answer:
                if isinstance(event, events.Delta):
                    emit(event)
                else:
                    terminal = event
        except Exception:
            log.exception("job %s: engine failed", job_id)
            terminal = None
        finally:
            active.dec()
            self._forget(job_id)
        if not publisher.flush(job_id):  # its last deltas are out before its end
            log.error("job %s: Redis failed while streaming; request aborted", job_id)
            terminal = None
        if terminal is None:  # failed mid-way: settle to what was generated
            terminal = dataclasses.replace(ENGINE_FAILURE, usage=progress.usage())
        self.finish(job_id, terminal)
        outcome = _STATUS_OF[type(terminal)].value
        metrics.JOBS.labels(kind, outcome).inc()
        span.set({"inferq.outcome": outcome, "gen_ai.usage.input_tokens": terminal.usage.prompt_tokens,
                  "gen_ai.usage.output_tokens": terminal.usage.completion_tokens})
        log.info("job %s %s: %d prompt + %d completion tokens, %.3fs", job_id, outcome,
                 terminal.usage.prompt_tokens, terminal.usage.completion_tokens, time.time() - started)

    def run_batch(self, job_id: str, params: dict[str, Any], context: dict[str, Any]) -> None:
        """Run a batch message's job at batch priority (``context``: the task's keyword arguments)."""
        self.run(job_id, JobRequest.from_dict(params), BATCH, request_id=context.get("request_id"),
                 enqueued_at=context.get("enqueued_at"), trace=context.get("trace"))

    def _apply_pending_cancel(self, job_id: str) -> None:
        with self._lock:
            pending = job_id in self._cancel_pending
            self._cancel_pending.discard(job_id)
        if pending:
            self.engine.abort(job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._active.discard(job_id)
            self._cancel_pending.discard(job_id)

    def _admission(self, job_id: str, progress: _Progress) -> AdmitCallback:
        def admit(prompt_tokens: int, max_new_tokens: int) -> events.Error | None:
            # Hold exactly the worst case now that the prompt length is known.
            progress.prompt_tokens = prompt_tokens
            fits = metering.adjust_reservation(self.redis, job_id, prompt_tokens + max_new_tokens,
                                               prompt_tokens=prompt_tokens)
            return None if fits else QUOTA_EXCEEDED

        return admit

    def finish(self, job_id: str, terminal: events.TerminalEvent) -> None:
        """Record the terminal status and publish the terminal event in one atomic step.

        With ``REDIS_WAIT_REPLICAS`` (sentinels), then WAIT until a replica holds it: a failover
        right after the write could lose it, leaving the job running on a live worker that
        the reaper never suspects. If the primary changed meanwhile, the end is written (and
        published) again on the new one (``queueing.replication.replicate``).
        """
        try:
            replication.replicate(self.redis, self.settings, lambda again: self._record_end(
                job_id, terminal, again), f"job {job_id}'s end")
        except redis.RedisError:
            log.exception("job %s: could not record its end (Redis unavailable)", job_id)

    def _record_end(self, job_id: str, terminal: events.TerminalEvent, again: bool) -> None:
        """The terminal transition; ``again`` on a new primary after a failover (idempotent)."""
        usage, status = terminal.usage, _STATUS_OF[type(terminal)]
        try:
            jobs.transition(
                self.redis, job_id, status, self.job_ttl,
                publish=events.encode(terminal),
                finished_at=time.time(),
                result=getattr(terminal, "body", None),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                error=getattr(terminal, "message", None),
                error_type=getattr(terminal, "error_type", None),
                error_code=getattr(terminal, "code", None),
                error_status=getattr(terminal, "status", None),
            )
        except TransitionRefused as refused:
            if refused.current is None:  # the record expired: the channel still needs its end
                log.warning("job %s: %s; publishing the terminal event only", job_id, refused)
                channel.publish(self.redis, job_id, terminal)
            elif again and refused.current is status:
                # The new primary has this end, but its event may have reached only the dead
                # primary's subscribers; a listener stops at the first terminal event.
                channel.publish(self.redis, job_id, terminal)
            elif refused.current.is_terminal:  # ended elsewhere (API, reaper), which published its end
                log.warning("job %s: %s; its end was already published", job_id, refused)
            else:  # requeued by the reaper, or a new primary that lost the job's start as well
                log.warning("job %s: %s; its end is not recorded (the job runs again)", job_id, refused)
