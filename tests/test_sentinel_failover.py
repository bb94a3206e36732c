"""The whole stack on a Redis Sentinel group (issue 14): a scripted worker and the API under
gunicorn, pointed at three sentinels; the primary or the replica is SIGKILLed under load.

What the API answered 202 for must survive the primary's death (``WAIT`` before the 202),
streams open at the kill must end (an error event, never a hang), new requests must succeed
soon after, and no inferq process may be restarted to get there.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from queueing import keys
from tests.conftest import (
    SCRIPTED_MODEL,
    TEST_KEY,
    Process,
    start_api,
    start_coordinator,
    start_worker,
    wait_for,
)
from tests.sentinel_group import SentinelGroup, sentinel_group
from tests.sse_client import frames

pytestmark = pytest.mark.timeout(300)

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    group: SentinelGroup
    worker: Process
    api: Process
    coordinator: Process
    base: str
    tmp: Path

    def processes(self) -> dict[str, Process]:
        return {"api": self.api, "worker": self.worker, "coordinator": self.coordinator}

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=AUTH, timeout=timeout)

    def redis(self) -> redis.Redis:
        """The current primary (as the sentinels name it)."""
        host, port = self.group.primary_address()
        return redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=5)


def _pids(pid: int) -> set[int]:
    """``pid`` and its descendants (gunicorn's workers, say)."""
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        todo += [int(child) for child in children]
    return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with sentinel_group(tmp_path / "redis") as group:
        url = f"redis://127.0.0.1:{group.primary.port}/0"  # for the helpers' readiness checks only
        env = {**group.env, "REDIS_WAIT_POLICY": "refuse", "REDIS_WAIT_TIMEOUT_MS": "500"}
        worker = start_worker(url, tmp_path, SCRIPTED_MODEL, 60, ENGINE="scripted", MAX_NUM_SEQS="32", **env)
        started: list[Process] = [worker]
        try:
            api, base = start_api(url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL,
                                  FILES_DIR=str(tmp_path / "files"), **env)
            started.append(api)
            coordinator = start_coordinator(url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL,
                                            FILES_DIR=str(tmp_path / "files"), **env)
            started.append(coordinator)
            yield Stack(group, worker, api, coordinator, base, tmp_path)
        finally:
            for process in reversed(started):
                process.stop()


def chat(text: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": SCRIPTED_MODEL, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}], **extra}


def submit_job(client: httpx.Client, text: str = "job") -> httpx.Response:
    return client.post("/v1/jobs", json={"endpoint": "/v1/chat/completions", "body": chat(text)})


def test_a_dead_replica_leaves_the_primary_serving_under_the_wait_policy(stack: Stack) -> None:
    """refuse: /v1/jobs and batches answer 503 and nothing is queued, streams still run; warn: 202
    and the job runs. A replica that comes back lifts the refusal."""
    warn_api, warn_base = start_api(f"redis://127.0.0.1:{stack.group.primary.port}/0", stack.tmp,
                                    SERVED_MODEL_NAME=SCRIPTED_MODEL, FILES_DIR=str(stack.tmp / "files"),
                                    **stack.group.env, REDIS_WAIT_POLICY="warn", REDIS_WAIT_TIMEOUT_MS="300")
    try:
        with stack.client() as refuse, httpx.Client(base_url=warn_base, headers=AUTH, timeout=30) as warn:
            assert submit_job(refuse).status_code == 202
            assert submit_job(warn).status_code == 202

            stack.group.replicas[0].kill()
            refused = submit_job(refuse, "refused")
            assert refused.status_code == 503, refused.text
            error = refused.json()["error"]
            assert error["code"] == "replication_unavailable" and "replica" in error["message"]
            assert refused.headers["Retry-After"] == "5"
            listed = refuse.get("/v1/jobs", params={"limit": 100}).json()["data"]
            assert len(listed) == 2  # the two accepted: a refused job is never written, so never runs
            file_id = _upload(refuse, [_line(i) for i in range(3)])
            batch = refuse.post("/v1/batches", json=_batch_request(file_id))
            assert batch.status_code == 503 and batch.json()["error"]["code"] == "replication_unavailable"
            streamed = refuse.post("/v1/chat/completions", json=chat("still streaming", stream=True))
            assert streamed.status_code == 200 and frames(streamed.text)[-1] == "[DONE]"

            accepted = submit_job(warn, "warned")
            assert accepted.status_code == 202, accepted.text
            done = warn.get(f"/v1/jobs/{accepted.json()['id']}", params={"wait": 30}).json()
            assert done["status"] == "succeeded"
            assert "replica(s) acknowledged it" in warn_api.log_path.read_text()

            stack.group.add_replica("returned")
            # A client retries a 503 (Retry-After: 5): the refusal lifts once the new replica
            # acknowledges, a moment after its sync on a busy machine.
            wait_for(lambda: submit_job(refuse, "replicated again").status_code == 202, 15,
                     "a job accepted again once a replica is back")
    finally:
        warn_api.stop()


def _line(i: int) -> dict[str, Any]:
    return {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": chat(f"[[delay=0.05]] line {i}", max_tokens=12)}


def _batch_request(file_id: str) -> dict[str, str]:
    return {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def _upload(client: httpx.Client, lines: list[dict[str, Any]]) -> str:
    body = "\n".join(json.dumps(line) for line in lines).encode() + b"\n"
    resp = client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", body)})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


@dataclass
class Load:
    """Jobs and streams sent from threads until stopped, and what came of each."""

    base: str
    stop: threading.Event = field(default_factory=threading.Event)
    accepted: list[str] = field(default_factory=list)  # 202'd job ids
    job_answers: Counter[int] = field(default_factory=Counter)
    streams: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, how it ended
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, streams: int = 4) -> None:
        self.threads = [threading.Thread(target=self._jobs, daemon=True)]
        self.threads += [threading.Thread(target=self._streams, daemon=True) for _ in range(streams)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(90)
            assert not thread.is_alive(), "a load thread hangs"

    def _jobs(self) -> None:
        with httpx.Client(base_url=self.base, headers=AUTH, timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    resp = submit_job(client, f"[[delay=0.02]] job {n}")
                except httpx.HTTPError:
                    self.job_answers[0] += 1
                    continue
                self.job_answers[resp.status_code] += 1
                if resp.status_code == 202:
                    self.accepted.append(resp.json()["id"])
                self.stop.wait(0.1)

    def _streams(self) -> None:
        with httpx.Client(base_url=self.base, headers=AUTH, timeout=60) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    resp = client.post("/v1/chat/completions",
                                       json=chat("[[delay=0.05]] stream", max_tokens=30, stream=True))
                    if resp.status_code != 200:
                        outcome = f"status {resp.status_code}"
                    else:
                        last = frames(resp.text)[-1]
                        outcome = "done" if last == "[DONE]" else "error event" if "error" in json.loads(
                            last) else f"unterminated: {last[:80]}"
                except httpx.ReadTimeout:
                    outcome = "hang"
                except httpx.HTTPError as exc:
                    outcome = f"transport {type(exc).__name__}"
                self.streams.append((started, time.monotonic(), outcome))
                if outcome != "done":
                    self.stop.wait(0.5)


def _first_success_after(base: str, since: float, deadline: float) -> float:
    """Seconds from ``since`` until a buffered chat request succeeded."""
    with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                resp = client.post("/v1/chat/completions", json=chat("are you back?", max_tokens=2))
                if resp.status_code == 200:
                    return time.monotonic() - since
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise AssertionError("no request succeeded after the failover")


def test_sigkilled_primary_under_load_loses_no_accepted_work(stack: Stack) -> None:
    pids = {name: _pids(process.proc.pid) for name, process in stack.processes().items()}
    with stack.client() as client:
        file_id = _upload(client, [_line(i) for i in range(200)])
        created = client.post("/v1/batches", json=_batch_request(file_id))
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]
        load = Load(stack.base)
        load.start()
        try:
            deadline = time.monotonic() + 60
            while client.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 40:
                assert time.monotonic() < deadline, "the batch did not get going"
                time.sleep(0.2)
            while len(load.accepted) < 10:
                time.sleep(0.1)

            old = stack.group.primary.port
            killed = time.monotonic()
            stack.group.primary.kill()
            back_after = _first_success_after(stack.base, killed, killed + 60)
            stack.group.wait_failed_over(old)
            time.sleep(max(0.0, killed + 20 - time.monotonic()))  # load goes on past the failover
        finally:
            load.finish()

        accepted = list(load.accepted)
        ends = {job_id: client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in accepted}
        batch = _wait_batch(client, batch_id, 180)

    assert back_after < 15, f"the first request succeeded {back_after:.1f}s after the kill"
    assert not [job_id for job_id, job in ends.items() if job.get("status") not in TERMINAL], ends
    settled = _ledger_rows(stack.tmp / "inferq.db", accepted, timeout=30)
    assert settled == Counter(accepted), "every 202'd job settles in the ledger, once"
    dead = stack.redis().xrange(keys.USAGE_DEAD_LETTERS)
    assert not [entry for _, entry in dead if entry.get("job_id") in ends], dead  # no second terminal event

    assert batch["status"] == "completed", batch
    custom_ids = _batch_custom_ids(stack, batch)
    assert sorted(custom_ids) == sorted(f"line-{i}" for i in range(200)), Counter(custom_ids).most_common(3)

    ended = ("done", "error event", "status 503")
    hung = [stream for stream in load.streams if stream[2] not in ended]
    assert not hung, hung
    assert any(outcome == "done" and start > killed for start, _, outcome in load.streams)
    assert all(process.proc.poll() is None for process in stack.processes().values())
    assert {name: _pids(process.proc.pid) for name, process in stack.processes().items()} == pids, \
        "an inferq process was restarted"
    # With its one replica promoted, the primary has none: jobs are refused until a host rejoins.
    stack.group.add_replica("rejoined")
    with stack.client() as client:
        assert submit_job(client, "after the rejoin").status_code == 202
    print(f"\nfirst success {back_after:.1f}s after the kill; jobs {dict(load.job_answers)}; "
          f"streams {Counter(outcome for _, _, outcome in load.streams)}")


def _wait_batch(client: httpx.Client, batch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch: dict[str, Any] = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            return batch
        time.sleep(0.5)


def _batch_custom_ids(stack: Stack, batch: dict[str, Any]) -> list[str]:
    ids = []
    with stack.client() as client:
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                text = client.get(f"/v1/files/{file_id}/content").text
                ids += [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
    return ids


def _ledger_rows(database: Path, job_ids: list[str], timeout: float) -> Counter[str]:
    """How many usage ledger rows each job has, once every job has one (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    wanted = set(job_ids)
    while True:
        with sqlite3.connect(database) as db:
            rows = [row[0] for row in db.execute("SELECT job_id FROM usage_ledger")]
        found = Counter(job_id for job_id in rows if job_id in wanted)
        if set(found) == wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
