"""Faults with real processes: a worker killed mid-stream (scripted engine, real Redis)."""

from __future__ import annotations

import json
import signal
import time

from queueing import jobs
from queueing.jobs import JobStatus
from tests.conftest import start_worker
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
