"""``inferq status``: its readers on the session's Redis, then the command against a running
scripted stack (``inferq run``, as tests/test_stack.py starts it) and against no worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console

from config import Settings
from inferq import status
from inferq.status_view import render
from queueing import keys, liveness
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, free_port, wait_for
from tests.test_gpu_monitor import FakeNvml, host_has_nvidia_driver, two_gpus
from tests.test_stack import _run_env, _start_run

STATUS = [sys.executable, "-m", "inferq.cli", "status"]
INFO = {"host": "gpu-host-1", "pid": 4242, "model": "?", "engine": "vllm", "devices": "0,1", "slots": 16,
        "batch_share": 0.5, "batch_slots": 8, "running": 3, "batch_running": 2}


def test_batch_statuses_in_progress_are_the_apis() -> None:
    from api.batches.store import RUNNING

    assert status.BATCHES_IN_PROGRESS == RUNNING


def test_heartbeat_description_expires_with_it_and_goes_on_retire(redis_client: redis.Redis) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    liveness.beat(redis_client, model, "w-short", 0.3, info={"pid": 1})
    liveness.beat(redis_client, model, "w-long", 30, info={"pid": 2})
    liveness.beat(redis_client, model, "w-old", 30)  # a worker of the previous version: no description
    mine = {w.worker_id: w.info for w in liveness.live_workers(redis_client) if w.model == model}
    assert mine == {"w-short": {"pid": 1}, "w-long": {"pid": 2}, "w-old": {}}
    time.sleep(0.5)
    liveness.retire(redis_client, model, "w-long")
    liveness.retire(redis_client, model, "w-old")
    assert [w for w in liveness.live_workers(redis_client) if w.model == model] == []
    assert redis_client.keys(keys.worker_info(model, "*")) == []


def add_batches(database_url: str, model: str) -> None:
    from api.db import Batch, Database

    db = Database(Settings(database_url=database_url))
    db.create_schema()
    now = int(time.time())
    with db.sessions.begin() as session:
        for batch_id, state, done in (("batch_running", "in_progress", 4), ("batch_done", "completed", 10)):
            session.add(Batch(id=batch_id, key_id="key_x", input_file_id="file_x",
                              endpoint="/v1/chat/completions", model=model, completion_window="24h",
                              status=state, total=10, dispatched=7, completed=done, failed=1,
                              created_at=now, expires_at=now + 86400))


def test_report_reads_workers_queues_jobs_and_batches(redis_client: redis.Redis, redis_url: str,
                                                      tmp_path: Path) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    described, old = "gpu-host-1-0123abcd", "old-host-89abcdef"
    liveness.beat(redis_client, model, described, 30, info={**INFO, "model": model})
    liveness.beat(redis_client, model, old, 30)
    redis_client.rpush(keys.model_queue(model), "a", "b", "c")
    redis_client.rpush(keys.batch_queue(model), "d", "e")
    redis_client.hset(keys.RUNNING_JOBS, f"job-{model}", keys.running_entry(model, described))
    database_url = f"sqlite:///{tmp_path / 'inferq.db'}"
    add_batches(database_url, model)
    try:
        settings = Settings(redis_url=redis_url, database_url=database_url, served_model_name=model)
        nowhere = f"http://127.0.0.1:{free_port()}"
        report = json.loads(json.dumps(status.collect(settings, nowhere, nowhere)))  # JSON-ready
    finally:
        liveness.retire(redis_client, model, described)
        liveness.retire(redis_client, model, old)
        redis_client.delete(keys.model_queue(model), keys.batch_queue(model))
        redis_client.hdel(keys.RUNNING_JOBS, f"job-{model}")
    mine = {w["id"]: w for w in report["workers"] if w["model"] == model}
    assert mine[described] == {
        "id": described, "model": model, "host": "gpu-host-1", "pid": 4242, "engine": "vllm",
        "devices": "0,1", "slots_in_use": 5, "slots": 16, "batch_share": 0.5, "batch_slots": 8,
        "batch_in_use": 2, "jobs_running": 1}
    assert mine[old]["host"] == "old-host" and mine[old]["pid"] is None and mine[old]["jobs_running"] == 0
    assert {"model": model, "interactive": 3, "batch": 2} in report["queues"]
    assert report["jobs"]["running"] >= 1 and report["jobs"]["queued"] >= 5
    [batch] = report["batches"]["in_progress"]
    assert (batch["id"], batch["status"], batch["total"], batch["completed"], batch["failed"]) == (
        "batch_running", "in_progress", 10, 4, 1)
    assert report["redis"]["reachable"] and report["redis"]["connected_clients"] >= 1
    assert [(e["name"], e["answers"]) for e in report["endpoints"]] == [("api", False), ("flower", False)]
    console = Console(record=True, width=120)
    render(report, console)
    screen = console.export_text()
    for text in ("gpu-host-1", "0,1", "5/16", "2/8 (0.5)", "batch_running", "not answering",
                 "Batches in progress"):
        assert text in screen, screen


def test_gpus_read_through_nvml_or_a_clear_no_gpu_line() -> None:
    found = status.gpus(FakeNvml(two_gpus()))
    assert found["available"] and [g["name"] for g in found["devices"]] == [
        "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    h100 = found["devices"][1]
    assert h100["temperature_celsius"] == 74 and h100["utilization_percent"] == 99
    missing = status.gpus(FakeNvml([], init_failures=1))
    assert not missing["available"] and missing["message"].startswith("no GPU")
    console = Console(record=True, width=120)
    render({"workers": [], "queues": [], "jobs": None, "batches": {"readable": True, "in_progress": []},
            "gpus": found, "redis": {"url": "redis://:***@h:1/0", "reachable": False, "error": "refused"},
            "endpoints": []}, console)
    screen = console.export_text()
    assert "H100" in screen and "70.0/80.0 GiB" in screen and "74 °C" in screen, screen
    assert status.redacted("redis://:hunter2@h:1/0") == "redis://:***@h:1/0"
    assert status.redacted("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"


def run_status(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STATUS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_status_of_a_running_scripted_stack(tmp_path: Path) -> None:
    api_port = free_port()
    env = _run_env(tmp_path, api_port)
    run, log_path = _start_run(tmp_path, env)
    base, flower = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{env['FLOWER_PORT']}"
    tokens = 60
    try:
        wait_for(lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, 120, "/ready", run)
        wait_for(lambda: httpx.get(f"{flower}/healthcheck", timeout=2).status_code == 200, 60, "Flower", run)
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {TEST_KEY}"},
                          json={"model": SCRIPTED_MODEL, "max_tokens": tokens, "stream": True,
                                "messages": [{"role": "user", "content": "[[delay=0.1]] hi"}]}) as resp:
            pieces = resp.iter_text()
            received = next(pieces)
            while "tok0" not in received:
                received += next(pieces)
            time.sleep(1.5)  # a heartbeat (every second here) carries the job
            as_json = run_status(env, tmp_path, "--json")
            received += "".join(pieces)
        screen = run_status(env, tmp_path)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)
            try:
                run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    output = log_path.read_text(errors="replace")
    assert received.rstrip().endswith("data: [DONE]"), received
    assert as_json.returncode == 0, as_json.stderr
    report: dict[str, Any] = json.loads(as_json.stdout)
    [worker] = report["workers"]
    assert f"worker started (pid={worker['pid']})" in output, output
    assert (worker["model"], worker["host"], worker["engine"], worker["slots"], worker["batch_share"],
            worker["batch_slots"]) == (SCRIPTED_MODEL, socket.gethostname(), "scripted", 4, 0.5, 2)
    assert worker["jobs_running"] == 1 and worker["slots_in_use"] == 1, worker
    [queue] = [q for q in report["queues"] if q["model"] == SCRIPTED_MODEL]
    assert isinstance(queue["interactive"], int) and isinstance(queue["batch"], int), queue
    assert report["jobs"]["running"] == 1 and isinstance(report["jobs"]["queued"], int), report["jobs"]
    assert report["batches"] == {"readable": True, "in_progress": []}, report["batches"]
    assert len(report["coordinators"]["live"]) == 1, report["coordinators"]  # inferq run's coordinator
    assert report["redis"]["reachable"] and report["redis"]["used_memory"] > 0, report["redis"]
    api, flower_state = report["endpoints"]
    assert (api["answers"], api["status"], api["ready"]) == (True, 200, 200), api
    assert (flower_state["answers"], flower_state["status"]) == (True, 200), flower_state
    if not host_has_nvidia_driver():
        assert report["gpus"]["message"].startswith("no GPU"), report["gpus"]
    assert screen.returncode == 0, screen.stderr
    assert "Workers (1 live)" in screen.stdout and SCRIPTED_MODEL in screen.stdout, screen.stdout


def test_status_without_a_live_worker_exits_non_zero(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, cwd=tmp_path)
    env = {**_run_env(tmp_path, free_port()), "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        wait_for(lambda: redis.Redis(port=port).ping(), 10, "redis-server", server)
        screen = run_status(env, tmp_path)
        as_json = run_status(env, tmp_path, "--json")
    finally:
        server.terminate()
        server.wait(10)
    assert screen.returncode == 1 and "no live worker" in screen.stderr, screen
    for text in ("Workers: none live", "Coordinators: none live", "not answering", "Batches: no database yet",
                 "GPUs:"):
        assert text in screen.stdout, screen.stdout
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["workers"] == [], as_json
    assert not (tmp_path / "inferq.db").exists()  # status reads; it never creates a database
    gone = run_status({**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, tmp_path)
    assert gone.returncode == 1 and "is unreachable" in gone.stderr, gone
