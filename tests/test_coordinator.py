"""The coordinator (``inferq coordinator``): the API's background work, in processes of its own.

Real parts: a private redis-server per test (no coordinator of another test's stack can take
its streams), a worker process with the scripted engine (test double), the API under
gunicorn, and coordinator processes. That ``create_app`` starts no background thread at all is
checked in ``tests/test_batch_recovery.py``.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from inferq.launcher import coordinator_argv
from queueing import keys
from tests.conftest import (
    SCRIPTED_MODEL,
    TEST_KEY,
    Process,
    base_env,
    redis_server,
    start_api,
    start_coordinator,
    start_worker,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


@dataclass
class Stack:
    redis_url: str
    tmp: Path
    base: str
    files_dir: str

    def coordinator(self, **env: str) -> Process:
        return start_coordinator(self.redis_url, self.tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL,
                                 FILES_DIR=self.files_dir, **env)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def batch(self, lines: int, delay: float = 0.0) -> str:
        """Upload ``lines`` chat lines and create their batch; its id."""
        prefix = f"[[delay={delay}]] " if delay else ""
        body = "\n".join(json.dumps({
            "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": SCRIPTED_MODEL, "max_tokens": 2,
                     "messages": [{"role": "user", "content": f"{prefix}line {i}"}]}}) for i in range(lines))
        uploaded = httpx.post(f"{self.base}/v1/files", headers=AUTH, data={"purpose": "batch"},
                              files={"file": ("in.jsonl", body.encode() + b"\n")}, timeout=30)
        assert uploaded.status_code == 200, uploaded.text
        created = httpx.post(f"{self.base}/v1/batches", headers=AUTH, timeout=30, json={
            "input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert created.status_code == 200, created.text
        return str(created.json()["id"])

    def get(self, batch_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/v1/batches/{batch_id}", headers=AUTH, timeout=10).json())

    def wait_until(self, batch_id: str, status: str, timeout: float) -> dict[str, Any]:
        wait_for(lambda: self.get(batch_id)["status"] == status, timeout, f"batch {status}")
        return self.get(batch_id)

    def output_custom_ids(self, batch: dict[str, Any]) -> Counter[str]:
        url = f"{self.base}/v1/files/{batch['output_file_id']}/content"
        content = httpx.get(url, headers=AUTH, timeout=30)
        assert content.status_code == 200, content.text
        return Counter(json.loads(line)["custom_id"] for line in content.text.splitlines() if line)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis, a scripted worker (4 batch slots) and one API; coordinators are each test's."""
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as url:
        worker = start_worker(url, tmp_path, SCRIPTED_MODEL, 60, ENGINE="scripted", MAX_NUM_SEQS="8")
        files_dir = str(tmp_path / "files")
        api, base = start_api(url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL, FILES_DIR=files_dir)
        try:
            yield Stack(url, tmp_path, base, files_dir)
        finally:
            api.stop()
            worker.stop()


def lease_holder_pid(client: redis.Redis, batch_id: str) -> int | None:
    """The pid in the batch lease's token (``host-pid-hex``), or None while nobody holds it."""
    token = client.get(keys.batch_dispatcher(batch_id))
    return int(str(token).rsplit("-", 2)[1]) if token else None


def test_without_a_coordinator_work_waits_in_redis_and_once_drains_and_dispatches_it(stack: Stack) -> None:
    client = stack.redis()
    batch_id = stack.batch(5)
    chat = httpx.post(f"{stack.base}/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": SCRIPTED_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    time.sleep(2)
    assert stack.get(batch_id)["status"] == "validating"  # nobody dispatches it
    assert client.xlen(keys.USAGE_STREAM) == 1  # the chat's usage waits for a drain

    env = base_env(stack.redis_url, stack.tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL, FILES_DIR=stack.files_dir,
                   COORDINATOR_METRICS_PORT="0")
    once = subprocess.run(coordinator_argv("--once"), env=env, capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    with sqlite3.connect(stack.tmp / "inferq.db") as db:  # the chat's usage is in SQL now
        assert db.execute("SELECT COUNT(*) FROM usage_ledger").fetchone() == (1,)
    dispatched = stack.get(batch_id)
    assert dispatched["status"] == "in_progress", dispatched  # every line queued; none collected yet

    coordinator = stack.coordinator()
    try:
        done = stack.wait_until(batch_id, "completed", 30)
    finally:
        coordinator.stop()
    assert done["request_counts"] == {"total": 5, "completed": 5, "failed": 0}, done
    assert stack.output_custom_ids(done) == Counter(f"line-{i}" for i in range(5))


def test_two_coordinators_share_the_work_and_one_killed_mid_dispatch_loses_nothing(stack: Stack) -> None:
    """SIGKILL the coordinator dispatching a batch (its lease lapses after 30 s): the other resumes
    it, and every line ends exactly once. Lines in flight are capped at 8, so the dispatch lasts
    as long as the batch runs."""
    caps = {"KEY_MAX_BATCH_LINES_IN_FLIGHT": "8"}
    coordinators = [stack.coordinator(**caps), stack.coordinator(**caps)]
    client = stack.redis()
    try:
        lines = 200
        batch_id = stack.batch(lines, delay=0.05)
        wait_for(lambda: stack.get(batch_id)["request_counts"]["completed"] >= 20, 60, "20 lines done")
        holder = lease_holder_pid(client, batch_id)
        [dispatcher] = [c for c in coordinators if c.pid == holder]
        dispatcher.proc.send_signal(signal.SIGKILL)
        dispatcher.proc.wait(10)
        survivor = next(c for c in coordinators if c is not dispatcher)
        done = stack.wait_until(batch_id, "completed", 120)
        log = survivor.log_tail(400)
    finally:
        for coordinator in coordinators:
            coordinator.stop()
    assert done["request_counts"] == {"total": lines, "completed": lines, "failed": 0}, done
    assert stack.output_custom_ids(done) == Counter(f"line-{i}" for i in range(lines))
    assert "resuming the dispatch" in log, log


def test_a_coordinator_stopped_mid_dispatch_lets_go_at_once(stack: Stack) -> None:
    """SIGTERM: the dispatcher releases the batch's lease as it stops, so the next coordinator
    resumes it right away instead of after the lease's 30 s."""
    caps = {"KEY_MAX_BATCH_LINES_IN_FLIGHT": "4"}
    client = stack.redis()
    first = stack.coordinator(**caps)
    try:
        batch_id = stack.batch(60, delay=0.05)
        wait_for(lambda: stack.get(batch_id)["request_counts"]["completed"] >= 5, 60, "5 lines done")
        assert lease_holder_pid(client, batch_id) == first.pid
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(20) == 0, first.log_tail()
    finally:
        first.stop()
    assert client.get(keys.batch_dispatcher(batch_id)) is None  # released, not left to lapse
    stopped_at = stack.get(batch_id)["request_counts"]["completed"]
    second = stack.coordinator(**caps)
    try:
        done = stack.wait_until(batch_id, "completed", 25)  # well inside what a lapse would take
    finally:
        second.stop()
    assert stopped_at < 60 and done["request_counts"] == {"total": 60, "completed": 60, "failed": 0}, done
    assert stack.output_custom_ids(done) == Counter(f"line-{i}" for i in range(60))
