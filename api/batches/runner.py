"""Runs batches: dispatches input lines as batch-queue jobs, collects finished lines,
and ends batches (completed, cancelled or expired) with their output and error files.

This is the coordinator's work (``inferq coordinator``, :mod:`api.coordinator`); the API
only stores a batch or marks it cancelling, and wakes a coordinator (:meth:`BatchRunner.wake`).
Every step that changes a batch as a whole (dispatching, expiring, cancelling its lines,
finalizing) is done by whoever holds the batch's short Redis lease. A coordinator's
:meth:`BatchRunner.tend` takes every unfinished batch nobody holds: it dispatches a new
one (on a thread that renews the lease while it works), resumes one whose dispatcher died
(lines with a result are skipped, and job creation is idempotent per line, so no line runs
twice), winds a cancelled batch down, expires one past its window, and finalizes one whose
lines all settled. Running two coordinators is safe: the lease decides.

Collecting finished lines and finalizing is :mod:`api.batches.collector`'s; holding a line back
while its key has no room is :mod:`api.batches.pacing`'s.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from api.accounts.auth import Principal
from api.batches.collector import REDIS_CHUNK, BatchCollector
from api.batches.lines import (
    EXPIRED,
    line_job_id,
    output_line,
    unrun_line,
)
from api.batches.pacing import BatchTokenBudget, Later, Paced, later, pace
from api.batches.status import OPEN, BatchStatus
from api.batches.store import Batch, BatchStore, LineResult, now
from api.files.store import FileStore
from api.generation.gateway import Gateway, Payer
from api.generation.job_request import parse_job_request
from api.http import errors
from api.protocol import ErrorResponse
from queueing import jobs, keys
from queueing.jobs import JobStatus

log = logging.getLogger(__name__)

CHECK_EVERY = 50  # lines dispatched between two looks at the batch's status and window
SAVE_EVERY = 100  # lines dispatched between two saves of the count (a resumer probes past it)
RECORD_CHUNK = 500  # expired lines recorded per transaction
RENEW_EVERY = 5.0
WAKE_BACKLOG = 1000  # wake-ups kept for coordinators (each is a hint: a periodic pass finds the batch anyway)


def is_due(batch: Batch) -> bool:
    """Whether the batch is still open past its completion window."""
    return batch.status in OPEN and now() >= batch.expires_at


class BatchRunner:
    """Dispatch, cancelling, expiry and finalization of batches (a coordinator's), and the API's
    hand-off to it (:meth:`wake`)."""

    def __init__(self, store: BatchStore, files: FileStore, gateway: Gateway, collector: BatchCollector,
                 principal_for: Callable[[str], Principal | None]):
        self.store = store
        self.files = files
        self.gateway = gateway
        self.collector = collector
        self.outputs = collector.outputs
        self.lease = collector.lease
        #: Looks a key up again while its batch dispatches (None: revoked, expired or gone).
        self.principal_for = principal_for
        self.budget = BatchTokenBudget(gateway.settings)
        #: Set when the coordinator stops: dispatchers let go of their batches (for the next one).
        self.stopping = threading.Event()
        self._dispatchers: set[threading.Thread] = set()

    # --- dispatch -----------------------------------------------------------

    def wake(self, batch_id: str) -> None:
        """Ask a coordinator to look at ``batch_id`` now (the API's call after creating or
        cancelling a batch). Never raises for Redis: the batch is stored, and a coordinator's
        periodic pass finds it anyway."""
        try:
            pipe = self.gateway.redis.pipeline(transaction=False)
            pipe.lpush(keys.BATCH_WAKE, batch_id)
            pipe.ltrim(keys.BATCH_WAKE, 0, WAKE_BACKLOG - 1)
            pipe.execute()
        except redis.RedisError:
            log.exception("batch %s: could not wake a coordinator; its next pass takes the batch", batch_id)

    def _spawn_dispatch(self, batch_id: str, token: str, payer: Payer, may_use: Any) -> None:
        """Dispatch on a daemon thread (of the coordinator) that keeps the caller's context."""
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run,
                                  args=(self._dispatch_safely, batch_id, token, payer, may_use),
                                  name=f"dispatch-{batch_id}", daemon=True)
        self._dispatchers.add(thread)
        thread.start()

    def join_dispatches(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the running dispatches; whether all ended."""
        deadline = time.monotonic() + timeout
        for thread in list(self._dispatchers):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._dispatchers)

    def _dispatch_safely(self, batch_id: str, token: str, payer: Payer, may_use: Any) -> None:
        try:
            self.dispatch(batch_id, token, payer, may_use)
        except redis.RedisError:  # the lease lapses and a live coordinator resumes the batch
            log.exception("batch %s: dispatch interrupted (Redis unavailable)", batch_id)
        except Exception:  # noqa: BLE001 - the batch fails rather than hangs
            log.exception("batch %s: dispatch failed", batch_id)
            self._fail(batch_id, "dispatch_failed", "The batch could not be dispatched.")
            self.lease.release(batch_id, token)
        finally:
            self._dispatchers.discard(threading.current_thread())

    def dispatch(self, batch_id: str, token: str, payer: Payer, may_use: Any) -> None:
        """Queue every line of the input file as a batch job, until the batch is cancelled or due.

        The caller holds the batch's lease (``token``); this lets go of it, unless it lapsed
        and someone else took it over: then this stops and leaves the batch to them.
        """
        batch = self.store.get(batch_id)
        info = self.files.get(batch.key_id, batch.input_file_id) if batch else None
        if batch is None or info is None:
            raise RuntimeError("batch or its input file vanished")
        self.store.transition(batch_id, BatchStatus.IN_PROGRESS)  # refused when resuming one in progress
        self.outputs.prepare(batch_id)
        finished = self.store.recorded(batch_id)  # none, unless resuming a dead dispatcher's batch
        seq = 0
        renewed = time.monotonic()
        for line_no, line in self.files.iter_lines(info):
            if self.stopping.is_set():  # lines with a job are not sent twice by the next dispatcher
                log.info("batch %s: its coordinator stops; left for the next one at line %d", batch_id, seq)
                self.lease.release(batch_id, token)
                return
            if seq % CHECK_EVERY == 0 and not self._may_dispatch(batch_id):
                break
            if time.monotonic() - renewed > RENEW_EVERY:
                if not self._renew(batch_id, token):
                    return
                renewed = time.monotonic()
            seq += 1
            if str(line.get("custom_id")) in finished:
                continue
            sent = self._dispatch_line(batch, token, payer, may_use, seq, line_no, line)
            if sent is Paced.LOST:
                if self.stopping.is_set():  # it stopped waiting for room: let the next one have it
                    self.lease.release(batch_id, token)
                return
            if sent is Paced.STOP:
                seq -= 1  # this line was not sent
                break
            if seq % SAVE_EVERY == 0:
                self.store.update(batch_id, dispatched=seq)
        if self._renew(batch_id, token):
            self._end_dispatch(batch_id, token, seq)

    def _renew(self, batch_id: str, token: str) -> bool:
        """Renew the dispatcher's lease; ``False`` (logged) if it lapsed and must not be used again."""
        if self.lease.renew(batch_id, token):
            return True
        log.warning("batch %s: this dispatcher's lease lapsed (another process may hold it); it stops",
                    batch_id)
        return False

    def _end_dispatch(self, batch_id: str, token: str, dispatched: int) -> None:
        """Expire the batch if it is due; else mark it dispatched and end it once its lines settle."""
        try:
            batch = self.store.get(batch_id)
            if batch is not None and is_due(batch):
                self._expire(batch, dispatched)
                return
            self.store.update(batch_id, dispatched=dispatched, dispatch_done=True)
        finally:
            self.lease.release(batch_id, token)
        if self._status(batch_id) == BatchStatus.CANCELLING:
            self.cancel_outstanding(batch_id)
        self.collector.maybe_finalize(batch_id)

    def _dispatch_line(self, batch: Batch, token: str, payer: Payer, may_use: Any, seq: int, line_no: int,
                       line: dict[str, Any]) -> Paced:
        """Enqueue one line (a line that cannot run settles as failed), waiting while its key has
        ``KEY_MAX_BATCH_LINES_IN_FLIGHT`` lines in flight or has spent its batch tokens per minute.

        While it waits, the lease is renewed and the batch's status looked at now and then.
        """
        result = pace(lambda: self._submit(batch, payer, may_use, seq, line_no, line),
                      lambda: not self.stopping.is_set() and self._renew(batch.id, token),
                      lambda: self._may_dispatch(batch.id))
        if isinstance(result, Paced):
            return result
        if result is not None:
            self.outputs.settle([result])
        return Paced.SENT

    def _submit(self, batch: Batch, payer: Payer, may_use: Any, seq: int, line_no: int,
                line: dict[str, Any]) -> LineResult | Later | None:
        """Enqueue one line; a line that cannot run is returned as its failed result, one that
        must wait for room as :class:`Later`."""
        job_id, custom_id = line_job_id(batch.id, seq), str(line["custom_id"])
        job = parse_job_request(batch.endpoint, line["body"])
        if isinstance(job, ErrorResponse):
            return self._failed(batch.id, custom_id, line_no, job_id, job)
        if job.stream:
            return self._failed(batch.id, custom_id, line_no, job_id, errors.invalid_request(
                "Batch lines are not streamed: leave out 'stream'.", "stream"))
        if not may_use(job.model):
            return self._failed(batch.id, custom_id, line_no, job_id, errors.error(
                404, f"The model '{job.model}' does not exist or you do not have access to it.",
                "invalid_request_error", "model_not_found", "model"))
        record = self.gateway.new_record(job, payer, job_id=job_id)
        record.batch_id, record.custom_id, record.endpoint = batch.id, custom_id, batch.endpoint
        record.batch_line = line_no
        charge = self.budget.charge(payer, job)
        submitted = self.gateway.enqueue_batch(record, charge=charge)
        if isinstance(submitted, ErrorResponse):
            return later(submitted, charge) or self._failed(batch.id, custom_id, line_no, job_id, submitted)
        return None

    @staticmethod
    def _failed(batch_id: str, custom_id: str, line_no: int, job_id: str, err: ErrorResponse) -> LineResult:
        line = output_line(custom_id, job_id, err.status_code, err.model_dump())
        return LineResult(batch_id, custom_id, line_no, ok=False, line=line)

    def _may_dispatch(self, batch_id: str) -> bool:
        batch = self.store.get(batch_id)
        if batch is None or batch.status not in OPEN or is_due(batch):
            return False
        if self.principal_for(batch.key_id) is None:
            # Revoked or expired while dispatching: stop, and cancel what is queued, as a cancel does.
            log.warning("batch %s: its API key was revoked; cancelling it", batch_id)
            self.store.transition(batch_id, BatchStatus.CANCELLING)
            return False
        return True

    def _status(self, batch_id: str) -> str | None:
        batch = self.store.get(batch_id)
        return batch.status if batch is not None else None

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        error = {"code": code, "message": message}
        if self.store.transition(batch_id, BatchStatus.FAILED, dispatch_done=True,
                                 errors_json=json.dumps({"object": "list", "data": [error]})):
            self.outputs.discard(batch_id)  # a failed batch has no output files

    # --- the coordinator's pass -------------------------------------------------

    def tend(self) -> int:
        """Take every unfinished batch nobody holds; returns how many dispatches it started.

        A batch past its window expires; a new one, or one whose dispatcher died, is
        dispatched; a cancelled one has its outstanding lines cancelled; one whose lines all
        settled (its collector's finalization failed, or lost the lease) is finalized.
        """
        started = 0
        for listed in self.store.unfinished():
            token = self.lease.take(listed.id)
            if token is None:
                continue
            batch = self.store.get(listed.id)  # as it is now that nobody else may change it
            if batch is None:
                self.lease.release(listed.id, token)
                continue
            if batch.status in OPEN and not batch.dispatch_done and not is_due(batch):
                started += self._start_dispatch(batch, token)
                continue
            try:
                if is_due(batch):
                    self._expire(batch)
                elif batch.status == BatchStatus.CANCELLING:
                    self._wind_down(batch)
            finally:
                self.lease.release(batch.id, token)
            self.collector.maybe_finalize(batch.id)
        return started

    def _wind_down(self, batch: Batch) -> None:
        """With the lease held: cancel a cancelling batch's outstanding lines (after saving how far
        a dispatcher that stopped while it was cancelled got)."""
        if not batch.dispatch_done:
            log.warning("batch %s: its dispatcher stopped while it was cancelled; winding it down", batch.id)
            self.store.update(batch.id, dispatched=self._last_dispatched(batch), dispatch_done=True)
        self.cancel_outstanding(batch.id)

    def _start_dispatch(self, batch: Batch, token: str) -> bool:
        payer = self.principal_for(batch.key_id)
        if payer is None:
            log.warning("batch %s: its key is gone; failing it", batch.id)
            self._fail(batch.id, "key_revoked",
                       "The batch's API key was revoked before all its lines were dispatched.")
            self.lease.release(batch.id, token)
            return False
        if batch.status == BatchStatus.VALIDATING:
            log.info("batch %s: dispatching %d lines", batch.id, batch.total)
        else:
            log.warning("batch %s: its dispatcher stopped; resuming the dispatch", batch.id)
        self._spawn_dispatch(batch.id, token, payer, payer.may_use)
        return True

    def _last_dispatched(self, batch: Batch) -> int:
        """How many lines a dead dispatcher walked: its saved count, and any it walked since."""
        info = self.files.get(batch.key_id, batch.input_file_id)
        if info is None:
            return batch.dispatched
        finished, last = self.store.recorded(batch.id), batch.dispatched
        for seq, (_, line) in enumerate(self.files.iter_lines(info), start=1):
            if seq <= batch.dispatched:
                continue
            if seq > batch.dispatched + SAVE_EVERY:
                break
            if str(line.get("custom_id")) in finished or jobs.get(
                    self.gateway.redis, line_job_id(batch.id, seq)) is not None:
                last = seq
        return last

    # --- cancel and expiry ------------------------------------------------------

    def cancel(self, batch: Batch) -> None:
        """Mark the batch cancelling and wake a coordinator: it stops the dispatch, cancels
        queued lines and aborts running ones (finished ones are kept), then ends the batch.
        A batch past its window is left to expire instead."""
        if is_due(batch):
            self.wake(batch.id)
            return
        if self.store.transition(batch.id, BatchStatus.CANCELLING):
            self.wake(batch.id)

    def cancel_outstanding(self, batch_id: str) -> None:
        """Cancel every dispatched line's job (finished ones stay as they are)."""
        batch = self.store.get(batch_id)
        if batch is None:
            return
        for first in range(1, batch.dispatched + 1, REDIS_CHUNK):
            last = min(first + REDIS_CHUNK, batch.dispatched + 1)
            self._cancel_jobs([line_job_id(batch_id, seq) for seq in range(first, last)])

    def _cancel_jobs(self, job_ids: list[str]) -> None:
        """Cancel those of the jobs still queued or running.

        Their statuses are read in one round trip; each live one then takes its own
        ``request_cancel`` (an atomic transition, or a message to the worker running it).
        """
        client, ttl = self.gateway.redis, self.gateway.settings.job_ttl
        pipe = client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        for job_id, status in zip(job_ids, pipe.execute(), strict=True):
            if status in (JobStatus.QUEUED, JobStatus.RUNNING):
                jobs.request_cancel(client, job_id, ttl)

    def _expire(self, batch: Batch, dispatched: int | None = None) -> None:
        """With the lease held: cancel the lines not done, give each an error line
        (``batch_expired``), and end the batch as ``expired`` with its files, in one update."""
        self.outputs.prepare(batch.id)  # for a batch no dispatcher ever started
        info = self.files.get(batch.key_id, batch.input_file_id)
        lines = self.files.iter_lines(info) if info is not None else iter(())
        if dispatched is None:  # a dead dispatcher may have sent up to SAVE_EVERY lines past its count
            dispatched = batch.dispatched + (0 if batch.dispatch_done else SAVE_EVERY)
        finished = self.store.recorded(batch.id)
        pending: list[LineResult] = []
        to_cancel: list[str] = []
        seq = 0
        for seq, (line_no, line) in enumerate(lines, start=1):
            custom_id = str(line.get("custom_id"))
            if custom_id in finished:
                continue
            job_id = line_job_id(batch.id, seq)
            if seq <= dispatched:
                to_cancel.append(job_id)
            pending.append(unrun_line(batch.id, custom_id, line_no, job_id, EXPIRED))
            if len(pending) >= RECORD_CHUNK:
                self._cancel_jobs(to_cancel)
                self.outputs.settle(pending)
                pending, to_cancel = [], []
        self._cancel_jobs(to_cancel)
        self.outputs.settle(pending)
        files = self.collector.seal(batch)
        # Expiry wins over a cancel that came in meanwhile (cancelling takes no lease).
        self.store.transition(batch.id, BatchStatus.EXPIRED, dispatch_done=True,
                              dispatched=max(seq, batch.dispatched), **files)
        log.info("batch %s expired", batch.id)
