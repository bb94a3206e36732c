"""Process-wide worker state: the engine, its job runner, and the background
threads that keep the worker visible (heartbeat) and cancellable."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from typing import Any

import redis
from celery import Celery

from config import Settings
from queueing import keys, liveness, recovery
from queueing.connections import redis_client
from workers import metrics
from workers.batch_consumer import BatchConsumer
from workers.engine import Engine
from workers.runner import JobRunner

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    """The engine named by ``ENGINE``: the real vLLM one, or a test double (scripted, or paced like a GPU)."""
    if settings.engine == "paced":
        from workers.paced_engine import PacedEngine

        return PacedEngine(step=settings.scripted_token_delay, model=settings.served_model_name,
                           max_model_len=settings.max_model_len)
    if settings.engine == "scripted":
        from workers.scripted_engine import ScriptedEngine

        return ScriptedEngine(token_delay=settings.scripted_token_delay, model=settings.served_model_name,
                              max_model_len=settings.max_model_len)
    from workers.vllm_engine import VllmEngine

    return VllmEngine(settings)


def interactive_slot_count(settings: Settings) -> int:
    """Celery task slots for interactive work: the engine's sequences plus a quarter more.

    At saturation a finished job's slot is handed to the next queued message only once
    Celery's event loop notices the ack (hundreds of ms at 256 streams here), so jobs
    beyond ``MAX_NUM_SEQS`` are taken into vLLM's own waiting queue instead; its
    scheduler starts each at the next engine step after a sequence ends.
    """
    return settings.max_num_seqs + max(4, settings.max_num_seqs // 4)


def batch_slot_count(settings: Settings) -> int:
    """How many engine slots batch work may hold at once."""
    return max(1, int(settings.max_num_seqs * settings.batch_share))


class WorkerRuntime:
    """Everything a worker process hosts besides Celery itself.

    ``celery`` is the worker's app: batch work is consumed and a dead worker's jobs are
    requeued through its broker connections.
    """

    def __init__(self, settings: Settings, engine: Engine, celery: Celery):
        self.settings = settings
        self.engine = engine
        self.celery = celery
        self.host = socket.gethostname()
        self.worker_id = f"{self.host}-{uuid.uuid4().hex[:8]}"
        self.redis = redis_client(settings)
        self.runner = JobRunner(engine, self.redis, self.worker_id, settings.job_ttl)
        self.batch = BatchConsumer(celery, keys.batch_queue(settings.served_model_name),
                                   batch_slot_count(settings), self.runner.run_batch)
        self.model_cards = json.dumps(engine.models(), separators=(",", ":"))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start heartbeats and the cancel listener.

        Batch work starts later, with :meth:`start_batch`.
        """
        metrics.SLOTS.set(self.settings.max_num_seqs)
        metrics.BATCH_SLOTS.set(batch_slot_count(self.settings))
        for target in (self._heartbeat_loop, self._cancel_loop):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self._threads.append(thread)

    def start_batch(self) -> None:
        """Start consuming batch work (idempotent). Called once Celery's worker is ready: by then
        Celery handles SIGTERM (a warm shutdown, then :meth:`stop` lets running lines finish); a
        line taken before that would die with a process that a SIGTERM still ends at once."""
        self.batch.start()

    def stop(self) -> None:
        """Finish batch lines in flight, stop the background threads, leave the live set,
        release the engine."""
        self.batch.stop()
        self._stopping.set()
        try:
            liveness.retire(self.redis, self.settings.served_model_name, self.worker_id)
        except redis.RedisError:
            log.warning("could not remove this worker from the live set")
        self.engine.shutdown()

    def describe(self) -> dict[str, Any]:
        """What ``inferq status`` shows of this worker (sent with each heartbeat)."""
        s = self.settings
        active = {sample.labels["priority"]: int(sample.value)
                  for family in metrics.ACTIVE_JOBS.collect() for sample in family.samples}
        return {"host": self.host, "pid": os.getpid(), "model": s.served_model_name, "engine": s.engine,
                "devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "slots": s.max_num_seqs,
                "batch_share": s.batch_share, "batch_slots": batch_slot_count(s),
                "running": active.get("interactive", 0), "batch_running": active.get("batch", 0)}

    def _heartbeat_loop(self) -> None:
        s = self.settings
        while not self._stopping.is_set():
            try:
                liveness.beat(self.redis, s.served_model_name, self.worker_id, s.worker_heartbeat_ttl,
                              self.model_cards, self.describe())
                recovery.reap(self.redis, self.celery, s.job_ttl)  # jobs of workers that died
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # noqa: BLE001 - never let the heartbeat thread die
                log.exception("reaping orphaned jobs failed")
            self._stopping.wait(s.worker_heartbeat_interval)

    def _cancel_loop(self) -> None:
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                while not self._stopping.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and self.runner.cancel(msg["data"]):
                        log.info("job %s aborted on request", msg["data"])
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                self._stopping.wait(1.0)
            finally:
                pubsub.close()
