"""Runs batches: dispatches input lines as batch-queue jobs, collects finished lines,
and finalizes the output and error files.

Dispatch runs on a background thread of the API process that created the batch,
which holds a short Redis lease on it while it works. If that process dies, another
API process finds the batch undispatched with no lease and resumes it: lines with a
result are skipped, and job creation is idempotent per line, so no line runs twice.
Collection rides on the usage stream: every finished job's terminal transition
appends an entry naming its batch, and whichever API process drains that entry
records the line (once per custom_id) and finalizes the batch after its last line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from pydantic import ValidationError

from api import errors
from api.auth import Principal
from api.batch_store import Batch, BatchStore, LineResult, now
from api.files import FileStore
from api.gateway import Gateway, Payer
from api.job_serving import REQUEST_MODELS, job_object
from api.protocol import ErrorResponse
from queueing import jobs, keys
from queueing.jobs import JobRecord, JobStatus

log = logging.getLogger(__name__)

CANCEL_CHECK_EVERY = 50  # lines dispatched between two looks at the batch's status
LEASE_SECONDS = 30  # a dispatcher that stops renewing its lease this long is presumed dead
RENEW_EVERY = 5.0
RESUME_EVERY = 10.0


def line_job_id(batch_id: str, seq: int) -> str:
    """The job id of a batch's ``seq``-th dispatched line (1-based)."""
    return f"{batch_id}-{seq}"


def output_line(custom_id: str, request_id: str, status_code: int, body: dict[str, Any] | None,
                error: dict[str, Any] | None = None) -> str:
    """One line of an output or error file, in OpenAI's format."""
    response = None if body is None else {"status_code": status_code, "request_id": request_id, "body": body}
    return json.dumps({"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": response,
                       "error": error}, separators=(",", ":"))


class BatchRunner:
    """Dispatch and collection for the batches of one API process."""

    def __init__(self, store: BatchStore, files: FileStore, gateway: Gateway):
        self.store = store
        self.files = files
        self.gateway = gateway
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"

    # --- dispatch -----------------------------------------------------------

    def start(self, batch: Batch, payer: Payer, may_use: Any) -> None:
        """Dispatch ``batch`` in the background (its lines log the creating request's id)."""
        if self._take_lease(batch.id):  # else another process dispatches it
            self._spawn_dispatch(batch.id, payer, may_use)

    def _spawn_dispatch(self, batch_id: str, payer: Payer, may_use: Any) -> None:
        """Dispatch on a daemon thread that keeps the caller's context (its request id)."""
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._dispatch_safely, batch_id, payer, may_use),
                         name=f"dispatch-{batch_id}", daemon=True).start()

    def _dispatch_safely(self, batch_id: str, payer: Payer, may_use: Any) -> None:
        try:
            self.dispatch(batch_id, payer, may_use)
        except redis.RedisError:  # the lease lapses and a live API process resumes the batch
            log.exception("batch %s: dispatch interrupted (Redis unavailable)", batch_id)
        except Exception:  # noqa: BLE001 - the batch fails rather than hangs
            log.exception("batch %s: dispatch failed", batch_id)
            self._fail(batch_id, "dispatch_failed", "The batch could not be dispatched.")

    def dispatch(self, batch_id: str, payer: Payer, may_use: Any) -> None:
        """Queue every line of the input file as a batch job, unless the batch is cancelled."""
        batch = self.store.get(batch_id)
        info = self.files.get(batch.key_id, batch.input_file_id) if batch else None
        if batch is None or info is None:
            raise RuntimeError("batch or its input file vanished")
        self.store.update(batch_id, only_if_status=("validating",), status="in_progress",
                          in_progress_at=now())
        finished = self.store.recorded(batch_id)  # none, unless resuming a dead dispatcher's batch
        seq = 0
        renewed = time.monotonic()
        for line_no, line in self.files.iter_lines(info):
            if seq % CANCEL_CHECK_EVERY == 0 and self._cancelling(batch_id):
                break
            if time.monotonic() - renewed > RENEW_EVERY:
                self._renew_lease(batch_id)
                renewed = time.monotonic()
            seq += 1
            if str(line.get("custom_id")) in finished:
                continue
            failure = self._submit(batch, payer, may_use, seq, line_no, line)
            if failure is not None:
                self.store.record(failure)
            if seq % 100 == 0:
                self.store.update(batch_id, dispatched=seq)
        self.store.update(batch_id, dispatched=seq, dispatch_done=True)
        self.gateway.redis.delete(keys.batch_dispatcher(batch_id))
        if self._cancelling(batch_id):
            self.cancel_outstanding(batch_id)
        self.maybe_finalize(batch_id)

    def _submit(self, batch: Batch, payer: Payer, may_use: Any, seq: int, line_no: int,
                line: dict[str, Any]) -> LineResult | None:
        """Enqueue one line; a line that cannot run is returned as its failed result."""
        job_id, custom_id = line_job_id(batch.id, seq), str(line["custom_id"])
        try:
            params = REQUEST_MODELS[batch.endpoint].model_validate(line["body"]).to_params()
        except ValidationError as exc:
            return self._failed(batch.id, custom_id, line_no, job_id, errors.from_validation_error(exc))
        if not may_use(params.model):
            return self._failed(batch.id, custom_id, line_no, job_id, errors.error(
                404, f"The model '{params.model}' does not exist or you do not have access to it.",
                "invalid_request_error", "model_not_found", "model"))
        record = self.gateway.new_record(params, payer, job_id=job_id)
        record.batch_id, record.custom_id, record.endpoint = batch.id, custom_id, batch.endpoint
        record.batch_line = line_no
        submitted = self.gateway.enqueue_batch(record)
        if isinstance(submitted, ErrorResponse):
            return self._failed(batch.id, custom_id, line_no, job_id, submitted)
        return None

    @staticmethod
    def _failed(batch_id: str, custom_id: str, line_no: int, job_id: str, err: ErrorResponse) -> LineResult:
        line = output_line(custom_id, job_id, err.status_code, err.model_dump())
        return LineResult(batch_id, custom_id, line_no, ok=False, line=line)

    # --- leases and resumption -------------------------------------------------

    def _take_lease(self, batch_id: str) -> bool:
        return bool(self.gateway.redis.set(keys.batch_dispatcher(batch_id), self.owner, nx=True,
                                           ex=LEASE_SECONDS))

    def _renew_lease(self, batch_id: str) -> None:
        self.gateway.redis.set(keys.batch_dispatcher(batch_id), self.owner, ex=LEASE_SECONDS)

    def resume_orphaned(self, principal_for: Callable[[str], Principal | None]) -> int:
        """Take over batches whose dispatcher died (no lease, lines left); returns how many."""
        resumed = 0
        for batch in self.store.undispatched():
            if not self._take_lease(batch.id):
                continue
            payer = principal_for(batch.key_id)
            if payer is None:
                log.warning("batch %s: its key is gone; failing it", batch.id)
                self._fail(batch.id, "key_revoked",
                           "The batch's API key was revoked before all its lines were dispatched.")
                continue
            log.warning("batch %s: its dispatcher stopped; resuming the dispatch", batch.id)
            self._spawn_dispatch(batch.id, payer, payer.may_use)
            resumed += 1
        return resumed

    def start_resumer(self, principal_for: Callable[[str], Principal | None]) -> threading.Event:
        """Check for orphaned batches every few seconds on a daemon thread; set the event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(RESUME_EVERY):
                try:
                    self.resume_orphaned(principal_for)
                except Exception:  # noqa: BLE001 - keep checking after Redis/SQL hiccups
                    log.exception("resuming orphaned batches failed")

        threading.Thread(target=loop, name="batch-resumer", daemon=True).start()
        return stop

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        error = {"code": code, "message": message}
        self.store.update(batch_id, status="failed", failed_at=now(), dispatch_done=True,
                          errors_json=json.dumps({"object": "list", "data": [error]}))

    def _cancelling(self, batch_id: str) -> bool:
        batch = self.store.get(batch_id)
        return batch is not None and batch.status == "cancelling"

    # --- cancel ---------------------------------------------------------------

    def cancel(self, batch: Batch) -> None:
        """Stop dispatching; cancel queued lines and abort running ones; keep finished ones."""
        self._wind_down(batch, cancelling_at=now())

    def expire_if_due(self, batch: Batch) -> Batch:
        """End a batch that outlived its completion window (it finishes as ``expired``)."""
        if batch.status in ("validating", "in_progress") and now() >= batch.expires_at:
            self._wind_down(batch, expired_at=now())
            return self.store.get(batch.id) or batch
        return batch

    def _wind_down(self, batch: Batch, **stamp: int) -> None:
        if not self.store.update(batch.id, only_if_status=("validating", "in_progress"),
                                 status="cancelling", **stamp):
            return
        fresh = self.store.get(batch.id)
        if fresh is not None and fresh.dispatch_done:  # else the dispatcher cancels when it stops
            self.cancel_outstanding(batch.id)
            self.maybe_finalize(batch.id)

    def cancel_outstanding(self, batch_id: str) -> None:
        batch = self.store.get(batch_id)
        if batch is None:
            return
        ttl = self.gateway.settings.job_ttl
        for seq in range(1, batch.dispatched + 1):
            jobs.request_cancel(self.gateway.redis, line_job_id(batch_id, seq), ttl)

    # --- collection -----------------------------------------------------------

    def on_settled(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Record finished batch lines (a hook of the usage ledger's drain)."""
        touched = set()
        stopped: dict[str, dict[str, str]] = {}  # batch id -> why its cancelled lines stopped
        for _, fields in entries:
            if fields.get("batch_id"):
                record = jobs.get(self.gateway.redis, fields["job_id"])
                if record is not None and record.batch_id and record.custom_id:
                    self.store.record(self._line_result(record, stopped))
                    touched.add(record.batch_id)
        for batch_id in touched:
            self.maybe_finalize(batch_id)

    def _line_result(self, record: JobRecord, stopped: dict[str, dict[str, str]]) -> LineResult:
        assert record.batch_id and record.custom_id
        line_no = record.batch_line or 0
        usage = (record.prompt_tokens or 0, record.completion_tokens or 0)
        job = job_object(record)
        if record.status is JobStatus.SUCCEEDED and job.response is not None:
            line = output_line(record.custom_id, record.id, 200, job.response)
            return LineResult(record.batch_id, record.custom_id, line_no, True, line, *usage)
        if record.status is JobStatus.CANCELLED:
            if record.batch_id not in stopped:
                stopped[record.batch_id] = self._stop_reason(record.batch_id)
            line = output_line(record.custom_id, record.id, 0, None, stopped[record.batch_id])
        else:
            error = job.error.model_dump() if job.error else {"message": "failed", "type": "server_error"}
            line = output_line(record.custom_id, record.id, record.error_status or 500, {"error": error})
        return LineResult(record.batch_id, record.custom_id, line_no, False, line, *usage)

    def _stop_reason(self, batch_id: str) -> dict[str, str]:
        """The error of a line its batch stopped: expired, or cancelled."""
        batch = self.store.get(batch_id)
        if batch is not None and batch.expired_at is not None:
            return {"code": "batch_expired", "message": "The batch expired before this request ran."}
        return {"code": "batch_cancelled", "message": "The batch was cancelled."}

    def maybe_finalize(self, batch_id: str) -> None:
        """After the last line: write the output and error files and end the batch."""
        batch = self.store.get(batch_id)
        if batch is None or not batch.dispatch_done or batch.completed + batch.failed < batch.dispatched:
            return
        if batch.status == "cancelling":
            if batch.expired_at:
                ended = self.store.update(batch_id, only_if_status=("cancelling",), status="expired")
            else:
                ended = self.store.update(batch_id, only_if_status=("cancelling",), status="cancelled",
                                          cancelled_at=now())
            if not ended:
                return
        elif not self.store.update(batch_id, only_if_status=("in_progress",), status="finalizing",
                                   finalizing_at=now()):
            return  # another process is finalizing it, or it ended already
        output_id = self._write(batch, ok=True)
        error_id = self._write(batch, ok=False)
        if batch.status == "cancelling":
            self.store.update(batch_id, output_file_id=output_id, error_file_id=error_id)
        else:
            self.store.update(batch_id, output_file_id=output_id, error_file_id=error_id, status="completed",
                              completed_at=now())
        log.info("batch %s finished: %d completed, %d failed", batch_id, batch.completed, batch.failed)

    def _write(self, batch: Batch, ok: bool) -> str | None:
        lines = self.store.lines(batch.id, ok)
        if not lines:
            return None
        name = f"{batch.id}_{'output' if ok else 'error'}.jsonl"
        return self.files.create_output(batch.key_id, name, lines).id
