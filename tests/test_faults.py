"""Faults with real processes (scripted engine as a test double, real Redis): workers killed or
stopped mid-stream, jobs and batch lines run again elsewhere, Redis restarted, an API drained."""

from __future__ import annotations

import json
import signal
import time

import pytest

from queueing import jobs, keys
from queueing.jobs import JobStatus
from tests.conftest import start_worker, wait_for
from tests.sse_client import frames


def test_sigkilled_worker_ends_the_stream_with_an_error(redis_url, app_config, auth, redis_client, tmp_path):
    from api import create_app

    model = "doomed-model"
    worker = start_worker(redis_url, tmp_path, model, 60, ENGINE="scripted")
    client = create_app({**app_config, "served_model_name": model, "idle_timeout": 60.0,
                         "worker_heartbeat_interval": 1.0}).test_client()
    try:
        resp = client.post("/v1/chat/completions", headers=auth, buffered=False, json={
            "model": model, "max_tokens": 100, "stream": True,
            "messages": [{"role": "user", "content": "[[delay=0.2]] go"}]})
        stream = iter(resp.response)
        first = next(stream).decode()
        job_id = json.loads(first[len("data: "):])["id"].removeprefix("chatcmpl-")
        next(stream)
        worker.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rest = b"".join(stream).decode()
        ended = time.monotonic() - killed
    finally:
        worker.stop()
    last = json.loads(frames(rest)[-1])
    assert last["error"]["code"] == "worker_lost"
    assert "[DONE]" not in rest
    assert ended < 10  # the heartbeat TTL (3 s in tests) plus a check interval, not the 60 s idle deadline
    assert jobs.get(redis_client, job_id).status is JobStatus.FAILED


def test_sigterm_lets_a_worker_finish_its_running_streams(redis_url, app_config, auth, tmp_path):
    from api import create_app
    from tests.sse_client import content

    model = "retiring-model"
    worker = start_worker(redis_url, tmp_path, model, 60, ENGINE="scripted")
    client = create_app({**app_config, "served_model_name": model}).test_client()
    try:
        resp = client.post("/v1/chat/completions", headers=auth, buffered=False, json={
            "model": model, "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "[[delay=0.1]] go"}]})
        stream = iter(resp.response)
        head = next(stream) + next(stream)
        worker.proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown
        body = (head + b"".join(stream)).decode()
        assert content(body) == " ".join(f"tok{i}" for i in range(20))
        assert frames(body)[-1] == "[DONE]"
        assert worker.proc.wait(20) == 0  # and then it exits
    finally:
        worker.stop()


def test_redis_restart_gives_fast_503s_then_recovers(app_config, auth, tmp_path):
    import subprocess

    import redis as redis_lib

    from api import create_app
    from inferq.launcher import redis_server_argv
    from tests.conftest import free_port, wait_for

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen(redis_server_argv(port, tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: redis_lib.Redis.from_url(url).ping(), 10, "redis-server", proc)
        return proc

    model = "weathering-model"
    server = start_redis()
    worker = start_worker(url, tmp_path, model, 60, ENGINE="scripted")
    client = create_app({**app_config, "redis_url": url, "served_model_name": model}).test_client()
    body = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    try:
        assert client.post("/v1/chat/completions", headers=auth, json=body).status_code == 200
        # Kill Redis while a job runs, so the worker also loses an unacknowledged task.
        slow = client.post("/v1/chat/completions", headers=auth, buffered=False, json={
            **body, "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "[[delay=0.3]] go"}]})
        next(iter(slow.response))
        server.kill()
        server.wait()
        slow.close()
        started = time.monotonic()
        down = client.post("/v1/chat/completions", headers=auth, json=body)
        assert down.status_code == 503 and down.json["error"]["code"] == "queue_unavailable"
        assert time.monotonic() - started < 5
        server = start_redis()  # empty: the worker must re-announce itself and re-consume
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            up = client.post("/v1/chat/completions", headers=auth, json=body)
            if up.status_code == 200:
                break
            time.sleep(0.5)
        assert up.status_code == 200, (up.json, worker.proc.poll())
        assert up.json["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    finally:
        worker.stop()
        server.kill()


def _running_on(redis_client, job_ids: list[str]) -> set[str]:
    records = [jobs.get(redis_client, j) for j in job_ids]
    return {str(r.worker) for r in records if r and r.status is JobStatus.RUNNING}


def _worker(redis_url, tmp_path, name: str, model: str, **extra: str):
    (tmp_path / name).mkdir(exist_ok=True)
    return start_worker(redis_url, tmp_path / name, model, 60, ENGINE="scripted", **extra)


def test_a_killed_workers_jobs_run_again_on_another_worker(redis_url, app_config, redis_client, tmp_path):
    """...and each is charged once, for the run whose usage it returns (a key with a daily quota)."""
    from api import create_app
    from tests.conftest import add_key

    model = "relay-model"
    key, _ = add_key(app_config["database_url"], daily_tokens=100_000)
    auth = {"Authorization": f"Bearer {key}"}
    first = _worker(redis_url, tmp_path, "a", model)
    second = None
    client = create_app({**app_config, "served_model_name": model}).test_client()
    try:
        bodies = [{"model": model, "max_tokens": 30,
                   "messages": [{"role": "user", "content": f"[[delay=0.1]] {i}"}]} for i in range(4)]
        ids = [client.post("/v1/jobs", headers=auth, json={"endpoint": "/v1/chat/completions", "body": b}
                           ).json["id"] for b in bodies]
        wait_for(lambda: len(_running_on(redis_client, ids)) == 1 and all(
            jobs.get(redis_client, j).status is JobStatus.RUNNING for j in ids), 20, "all jobs running")
        second = _worker(redis_url, tmp_path, "b", model)
        first.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        done = [client.get(f"/v1/jobs/{j}?wait=30", headers=auth).json for j in ids]
        took = time.monotonic() - killed
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert [d["status"] for d in done] == ["succeeded"] * 4
    assert all(d["usage"]["completion_tokens"] == 30 for d in done)
    texts = [d["response"]["choices"][0]["message"]["content"] for d in done]
    assert texts == [" ".join(f"tok{i}" for i in range(30))] * 4  # a clean rerun, not a spliced one
    assert took < 15  # heartbeat TTL (3 s) + a reap + 3 s of generation, not the visibility timeout
    assert not set(ids) & set(redis_client.hkeys(keys.RUNNING_JOBS))
    # Each ran twice: requeued once by a live worker's reaper (any worker on this Redis may reap).
    assert [redis_client.hget(keys.job(j), "attempts") for j in ids] == ["1"] * 4
    # Charged once each: the ledger and the quota counter hold exactly the usage the jobs returned.
    returned = [(d["usage"]["prompt_tokens"], d["usage"]["completion_tokens"]) for d in done]
    assert all(prompt > 0 for prompt, _ in returned)
    today = client.get("/v1/usage", headers=auth).json["today"]
    assert (today["requests"], today["prompt_tokens"], today["completion_tokens"]) == (
        4, sum(p for p, _ in returned), 4 * 30)
    quota_keys = {redis_client.hget(keys.job(j), "quota_key") for j in ids}
    assert len(quota_keys) == 1 and None not in quota_keys
    counter = redis_client.hgetall(quota_keys.pop())
    assert int(counter["used"]) == sum(p + c for p, c in returned)
    assert int(counter.get("reserved", 0)) == 0  # no reservation left behind by the first runs


def test_a_batch_survives_a_killed_worker_with_every_line_once(redis_url, app_config, auth, redis_client,
                                                               tmp_path):
    from api import create_app
    from api.coordinator import Coordinator
    from tests.test_batches import upload
    from tests.test_batches import wait_for as wait_for_batch

    model = "relay-batch-model"
    first = _worker(redis_url, tmp_path, "a", model, MAX_NUM_SEQS="8")
    second = None
    app = create_app({**app_config, "served_model_name": model})
    client = app.test_client()
    coordinator = Coordinator(app.extensions["inferq"], interval=0.5)  # dispatches and collects the batch
    coordinator.start()
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "max_tokens": 10,
                       "messages": [{"role": "user", "content": f"[[delay=0.1]] {i}"}]}} for i in range(12)]
    try:
        file_id = upload(client, auth, lines)
        batch = client.post("/v1/batches", headers=auth, json={
            "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json
        time.sleep(1.5)  # the first lines are running on the first worker
        second = _worker(redis_url, tmp_path, "b", model, MAX_NUM_SEQS="8")
        first.proc.send_signal(signal.SIGKILL)
        done = wait_for_batch(client, auth, batch["id"], ("completed", "failed"), timeout=60)
    finally:
        coordinator.stop()
        first.stop()
        if second is not None:
            second.stop()
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=auth).get_data(as_text=True)
    custom_ids = [json.loads(line)["custom_id"] for line in output.splitlines()]
    assert sorted(custom_ids) == sorted(f"line-{i}" for i in range(12))  # each exactly once
    requeued = [redis_client.hget(keys.job(f"{batch['id']}-{seq}"), "attempts") for seq in range(1, 13)]
    assert "1" in requeued  # the kill did orphan running lines, and they ran again


def test_sigterm_with_batch_lines_in_flight_finishes_them_and_leaves_the_rest_queued(
        redis_url, app_config, auth, redis_client, tmp_path):
    """The worker's BatchConsumer stops taking lines, lets the running ones finish and acknowledges
    them; the lines it never took stay on the queue for the next worker. None lost, none run twice."""
    from api import create_app
    from api.batches.lines import line_job_id
    from api.coordinator import Coordinator
    from tests.test_batches import upload
    from tests.test_batches import wait_for as wait_for_batch

    model = "draining-batch-model"
    first = _worker(redis_url, tmp_path, "a", model, MAX_NUM_SEQS="4")  # 2 batch slots (BATCH_SHARE 0.5)
    second = None
    app = create_app({**app_config, "served_model_name": model})
    client = app.test_client()
    coordinator = Coordinator(app.extensions["inferq"], interval=0.5)  # dispatches and collects the batch
    coordinator.start()
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "max_tokens": 10,
                       "messages": [{"role": "user", "content": f"[[delay=0.1]] {i}"}]}} for i in range(6)]
    try:
        batch = client.post("/v1/batches", headers=auth, json={
            "input_file_id": upload(client, auth, lines), "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}).json
        ids = [line_job_id(batch["id"], seq) for seq in range(1, 7)]

        def records() -> list[jobs.JobRecord | None]:
            return [jobs.get(redis_client, j) for j in ids]

        wait_for(lambda: sum(r is not None and r.status is JobStatus.RUNNING for r in records()) == 2,
                 20, "two lines running")
        in_flight = [j for j, r in zip(ids, records(), strict=True) if r and r.status is JobStatus.RUNNING]
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        after = dict(zip(ids, records(), strict=True))
        assert all(r is not None for r in after.values()), after  # every line was dispatched
        statuses = {j: r.status for j, r in after.items() if r is not None}
        assert all(statuses[j] is JobStatus.SUCCEEDED for j in in_flight), statuses  # finished, not dropped
        # None left running: each either finished here or was never taken.
        assert set(statuses.values()) <= {JobStatus.SUCCEEDED, JobStatus.QUEUED}, statuses
        queued = sum(status is JobStatus.QUEUED for status in statuses.values())
        # One message per line not run yet, none for a finished line (acknowledged before the channel closed).
        assert redis_client.llen(keys.batch_queue(model)) == queued, statuses
        second = _worker(redis_url, tmp_path, "b", model, MAX_NUM_SEQS="4")
        done = wait_for_batch(client, auth, batch["id"], ("completed", "failed"), timeout=60)
    finally:
        coordinator.stop()
        first.stop()
        if second is not None:
            second.stop()
    assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}, done
    output = client.get(f"/v1/files/{done['output_file_id']}/content", headers=auth).get_data(as_text=True)
    custom_ids = sorted(json.loads(line)["custom_id"] for line in output.splitlines())
    assert custom_ids == [f"line-{i}" for i in range(6)]  # each exactly once
    assert [redis_client.hget(keys.job(j), "attempts") for j in ids] == [None] * 6  # no reaper rerun
    assert "not started" not in second.log_path.read_text()  # no finished line delivered again


def test_sigterm_to_the_api_drains_its_open_streams(redis_url, scripted_worker, tmp_path):
    import httpx

    from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api
    from tests.sse_client import content

    api, base = start_api(redis_url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL, API_GRACEFUL_TIMEOUT="20")
    body = {"model": SCRIPTED_MODEL, "max_tokens": 30, "stream": True,
            "messages": [{"role": "user", "content": "[[delay=0.1]] go"}]}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {TEST_KEY}"}) as resp:
            chunks = resp.iter_text()
            received = next(chunks)
            api.proc.send_signal(signal.SIGTERM)  # gunicorn: stop accepting, finish open requests
            signalled = time.monotonic()
            time.sleep(1.5)  # the gevent worker checks its alive flag each second
            with pytest.raises(httpx.ConnectError):  # draining: no new connections
                httpx.get(f"{base}/health", timeout=2)
            received += "".join(chunks)
        assert frames(received)[-1] == "[DONE]"
        assert content(received) == " ".join(f"tok{i}" for i in range(30))
        assert api.proc.wait(20) == 0
        assert time.monotonic() - signalled < 15
    finally:
        api.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_hangs_up_before_the_first_token_cancels_its_job(redis_url, scripted_worker, redis_client,
                                                                     tmp_path, stream):
    """No byte has been written to the client yet, so only the socket tells that it left."""
    import socket
    import uuid

    from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api

    api, base = start_api(redis_url, tmp_path, SERVED_MODEL_NAME=SCRIPTED_MODEL)
    marker = f"m{uuid.uuid4().hex}"
    payload = json.dumps({"model": SCRIPTED_MODEL, "max_tokens": 5, "stream": stream,
                          "messages": [{"role": "user", "content": f"{marker} [[first_delay=30]]"}]}).encode()
    host, port = base.removeprefix("http://").split(":")
    try:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                     + payload)

        found: list[jobs.JobRecord] = []

        def job_started() -> bool:
            for key in redis_client.scan_iter(keys.job("*")):
                record = jobs.get(redis_client, key.removeprefix(keys.job("")))
                running = record is not None and record.status is JobStatus.RUNNING
                if running and marker in json.dumps(record.request.to_dict()):
                    found.append(record)
                    return True
            return False

        wait_for(job_started, 10, "the job to start")
        job_id = found[0].id
        sock.close()
        hung_up = time.monotonic()
        wait_for(lambda: jobs.get(redis_client, job_id).status is JobStatus.CANCELLED, 10, "the job's cancel")
        assert time.monotonic() - hung_up < 5  # within a few heartbeat steps, not the 30 s first-token wait
    finally:
        api.stop()
