"""Collects a batch's finished lines and ends the batch once the last one is in.

A batch job's terminal transition appends an entry naming its batch to the batch-lines
stream (``inferq:batch-lines``). The coordinators drain that stream through their own
consumer group (:mod:`queueing.stream_group`): whichever reads an entry records the line
in SQL (once per custom_id), appends it to the batch's output or error file
(:mod:`api.batches.outputs`), and finalizes the batch after its last line, holding the
batch's lease (:mod:`api.batches.lease`). An entry it can never record is set aside in
``inferq:batch-lines:dead`` with why, so it holds back no other line.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

import redis

from api.batches.lease import BatchLease
from api.batches.lines import CANCELLED, EXPIRED, line_result, line_seq, lost_result
from api.batches.outputs import BatchOutputs
from api.batches.status import BatchStatus
from api.batches.store import Batch, BatchStore, LineResult
from api.db import describe, is_entry_fault
from api.files.store import FileStore
from api.http import metrics
from queueing import keys
from queueing.jobs import JobRecord, JobStatus
from queueing.stream_group import Entry, StreamGroup, drain_forever, each_apart

log = logging.getLogger(__name__)

REDIS_CHUNK = 500  # jobs whose records one pipeline reads


def ready_to_end(batch: Batch) -> bool:
    """Whether every dispatched line of a batch that has not ended has settled."""
    return (batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)
            and batch.dispatch_done
            and batch.completed + batch.failed >= batch.dispatched)


class BatchCollector:
    """Records finished batch lines and finalizes their batches (for one coordinator)."""

    def __init__(self, store: BatchStore, files: FileStore, outputs: BatchOutputs, lease: BatchLease,
                 client: redis.Redis):
        self.store = store
        self.files = files
        self.outputs = outputs
        self.lease = lease
        self.redis = client
        self.group = StreamGroup(client, keys.BATCH_LINES_STREAM, keys.BATCH_COLLECTOR_GROUP,
                                 keys.BATCH_LINES_DEAD_LETTERS)

    @classmethod
    def for_store(cls, store: BatchStore, files: FileStore, client: redis.Redis) -> BatchCollector:
        """A collector with its own output writer and batch lease over ``store`` and ``files``."""
        return cls(store, files, BatchOutputs(files, store), BatchLease(client), client)

    def drain(self, count: int = 500) -> int:
        """Record up to ``count`` finished lines from the batch-lines stream; returns how many were read.

        Lines whose data the database refuses (one by one, after the whole read failed) are set
        aside with why; the others are recorded and every entry acknowledged.
        """
        entries = self.group.read(count)
        if not entries:
            return 0
        dead = each_apart(self.on_settled, entries, "collect", is_entry_fault, describe)
        self.group.acknowledge(entries, dead)
        for letter in dead:
            metrics.LEDGER_DEAD_LETTERS.labels(letter.stage).inc()
        return len(entries)

    def run_forever(self, stop: threading.Event) -> None:
        """Collect until ``stop`` is set (the coordinator's batch-collection thread)."""
        drain_forever(self.drain, stop, "batch collection")

    def on_settled(self, entries: list[Entry]) -> None:
        """Record finished batch lines (idempotent: an entry delivered again records nothing new).

        A line whose job record expired before it was drained is recorded as failed,
        so its batch still ends.
        """
        results: list[LineResult] = []
        lost: dict[str, dict[int, dict[str, str]]] = defaultdict(dict)  # batch id -> seq -> entry
        stopped: dict[str, dict[str, str]] = {}  # batch id -> why its cancelled lines stopped
        lines = [fields for _, fields in entries if fields.get("batch_id")]
        for fields, record in zip(lines, self._job_records([f["job_id"] for f in lines]), strict=True):
            if record is not None and record.batch_id and record.custom_id:
                if record.status is JobStatus.CANCELLED and record.batch_id not in stopped:
                    stopped[record.batch_id] = self._stop_reason(record.batch_id)
                results.append(line_result(record, stopped.get(record.batch_id, CANCELLED)))
            else:
                lost[fields["batch_id"]][line_seq(fields["job_id"])] = fields
        for batch_id, by_seq in lost.items():
            results += self._lost_results(batch_id, by_seq)
        self.outputs.settle(results)
        for batch_id in {result.batch_id for result in results}:
            self.maybe_finalize(batch_id)

    def _job_records(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The jobs' records (``None`` for an expired one), as :func:`jobs.get` reads them,
        ``REDIS_CHUNK`` to a round trip."""
        records: list[JobRecord | None] = []
        for first in range(0, len(job_ids), REDIS_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for job_id in job_ids[first:first + REDIS_CHUNK]:
                pipe.hgetall(keys.job(job_id))
            records += [JobRecord.from_hash(data) if data else None for data in pipe.execute()]
        return records

    def _stop_reason(self, batch_id: str) -> dict[str, str]:
        """The error of a line its batch stopped: expired, or cancelled."""
        batch = self.store.get(batch_id)
        return EXPIRED if batch is not None and batch.expired_at is not None else CANCELLED

    def _lost_results(self, batch_id: str, by_seq: dict[int, dict[str, str]]) -> list[LineResult]:
        """Failed lines for finished jobs whose records expired, found by their place in the input."""
        batch = self.store.get(batch_id)
        if batch is None:
            return []
        info = self.files.get(batch.key_id, batch.input_file_id)
        named: dict[int, tuple[str, int]] = {}  # seq -> (custom_id, line number)
        if info is not None:
            for seq, (line_no, line) in enumerate(self.files.iter_lines(info), start=1):
                if seq in by_seq:
                    named[seq] = (str(line.get("custom_id")), line_no)
                if len(named) == len(by_seq):
                    break
        results = []
        for seq, fields in by_seq.items():
            custom_id, line_no = named.get(seq, (fields["job_id"], 0))  # input deleted: the job id stands in
            results.append(lost_result(batch_id, custom_id, line_no, fields))
        return results

    def maybe_finalize(self, batch_id: str) -> None:
        """After the last line: seal the output and error files and end the batch.

        Whoever holds the lease does it. A process that finds the lease held gives
        up, and every holder calls this again after letting go, so a line that
        settled meanwhile never leaves its batch waiting.
        """
        for _ in range(3):  # a status that changed under us, then the end
            batch = self.store.get(batch_id)
            if batch is None or not ready_to_end(batch):
                return
            token = self.lease.take(batch_id)
            if token is None:
                return
            try:
                self._finalize(batch_id)
            finally:
                self.lease.release(batch_id, token)

    def _finalize(self, batch_id: str) -> None:
        """With the lease held: end a batch whose lines all settled, files and status in one update."""
        batch = self.store.get(batch_id)
        if batch is None or not ready_to_end(batch):
            return
        if batch.status == BatchStatus.IN_PROGRESS:
            if not self.store.transition(batch_id, BatchStatus.FINALIZING):
                return  # cancelled meanwhile: the caller looks again
            batch.status = BatchStatus.FINALIZING
        end = BatchStatus.CANCELLED if batch.status == BatchStatus.CANCELLING else BatchStatus.COMPLETED
        self.store.transition(batch_id, end, **self.seal(batch))
        log.info("batch %s %s: %d completed, %d failed", batch_id, end, batch.completed, batch.failed)

    def seal(self, batch: Batch) -> dict[str, str | None]:
        """Seal the batch's output and error files: their ids, as the batch row names them."""
        return {"output_file_id": self.outputs.seal(batch, ok=True),
                "error_file_id": self.outputs.seal(batch, ok=False)}
