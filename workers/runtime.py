"""Process-wide worker state: the engine, its job runner, and the background
threads that keep the worker visible (heartbeat) and cancellable."""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid

import redis

from config import Settings
from queueing import keys, liveness, recovery
from queueing.celery_app import app as celery_app
from queueing.connections import get_redis
from workers import metrics
from workers.batch_consumer import BatchConsumer
from workers.engine import Engine
from workers.runner import JobRunner

log = logging.getLogger(__name__)

_current: WorkerRuntime | None = None


def build_engine(settings: Settings) -> Engine:
    """The engine named by ``ENGINE``: the real vLLM one, or the scripted test double."""
    if settings.engine == "scripted":
        from workers.scripted_engine import ScriptedEngine

        return ScriptedEngine(token_delay=settings.scripted_token_delay, model=settings.served_model_name,
                              max_model_len=settings.max_model_len)
    from workers.vllm_engine import VllmEngine

    return VllmEngine(settings)


def batch_slot_count(settings: Settings) -> int:
    """How many engine slots batch work may hold at once."""
    return max(1, int(settings.max_num_seqs * settings.batch_share))


class WorkerRuntime:
    """Everything a worker process hosts besides Celery itself."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.worker_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.redis = get_redis(settings.redis_url)
        self.runner = JobRunner(engine, self.redis, self.worker_id, settings.job_ttl)
        self.batch = BatchConsumer(celery_app, keys.batch_queue(settings.served_model_name),
                                   batch_slot_count(settings), self.runner.run_batch)
        self.model_cards = json.dumps(engine.models(), separators=(",", ":"))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start heartbeats and the cancel listener; make this the current runtime."""
        global _current
        _current = self
        metrics.SLOTS.set(self.settings.max_num_seqs)
        metrics.BATCH_SLOTS.set(batch_slot_count(self.settings))
        for target in (self._heartbeat_loop, self._cancel_loop):
            thread = threading.Thread(target=target, name=target.__name__, daemon=True)
            thread.start()
            self._threads.append(thread)
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

    def _heartbeat_loop(self) -> None:
        s = self.settings
        while not self._stopping.is_set():
            try:
                liveness.beat(self.redis, s.served_model_name, self.worker_id, s.worker_heartbeat_ttl,
                              self.model_cards)
                recovery.reap(self.redis, celery_app, s.job_ttl)  # jobs of workers that died
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


def current() -> WorkerRuntime:
    """The runtime of this worker process (set by :meth:`WorkerRuntime.start`)."""
    if _current is None:
        raise RuntimeError("no worker runtime: start the worker with `inferq worker`")
    return _current
