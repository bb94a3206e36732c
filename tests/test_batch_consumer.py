"""The worker's batch consumer (``workers.batch_consumer``) against a real Redis broker: at most
``slots`` lines at once, each exactly once, and a slot that frees takes the next line at once."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import redis

from config import Settings
from queueing import keys
from queueing.celery_app import enqueue_generation, make_celery
from workers import batch_consumer
from workers.batch_consumer import BatchConsumer


def test_lines_run_once_each_within_the_slots_and_a_freed_slot_is_refilled_at_once(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    # Waits far longer than the whole run: a slot that waited for the consumer's next poll to
    # be acknowledged (and refilled) would make the run last many of them.
    monkeypatch.setattr(batch_consumer, "BUSY_WAIT", 5.0)
    monkeypatch.setattr(batch_consumer, "IDLE_WAIT", 5.0)
    model = f"consumer-{uuid.uuid4().hex[:8]}"
    app = make_celery(Settings(redis_url=redis_url, served_model_name=model))
    job_ids = [f"line-{i}" for i in range(8)]
    for job_id in job_ids:
        enqueue_generation(app, job_id, {"body": {}}, model, batch=True)

    lock = threading.Lock()
    ran: list[str] = []
    running, most = 0, 0

    def handle(job_id: str, params: dict[str, Any], context: dict[str, Any]) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.1)
        with lock:
            running -= 1
            ran.append(job_id)

    consumer = BatchConsumer(app, keys.batch_queue(model), 2, handle)
    started = time.monotonic()
    consumer.start()
    deadline = started + 30
    while len(ran) < len(job_ids) and time.monotonic() < deadline:
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    consumer.stop(timeout=10)

    assert sorted(ran) == sorted(job_ids)  # each line once
    assert most == 2  # never more than the slots
    assert elapsed < 4.5  # 4 waves of 0.1 s, not a 5 s poll per wave
    assert redis_client.llen(keys.batch_queue(model)) == 0
    unacked = redis_client.hvals("unacked")  # kombu's: every line acknowledged, none comes back
    assert not [entry for entry in unacked if model in str(entry)]
