"""Prometheus metrics of the API and the worker, and request ids carried into the worker's logs.

Real processes: gunicorn with two gevent workers (multiprocess metrics), Celery
workers with the scripted engine (a test double), a real Redis.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    SCRIPTED_MODEL,
    TEST_KEY,
    Process,
    base_env,
    free_port,
    start_worker,
    wait_for,
)

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
METRICS_MODEL = "metrics-model"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    return sum(v for (n, ls), v in page.items() if n == name and set(labels.items()) <= set(ls))


def chat(text: str, model: str = SCRIPTED_MODEL, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def test_in_process_metrics_page(client, scripted_worker):
    before = samples(client.get("/metrics").get_data(as_text=True))
    assert client.post("/v1/chat/completions", json=chat("a"), headers=AUTH).status_code == 200
    streamed = client.post("/v1/chat/completions", json=chat("b", stream=True), headers=AUTH)
    assert streamed.status_code == 200 and streamed.get_data(as_text=True).endswith("data: [DONE]\n\n")
    assert client.get("/v1/models", headers={"Authorization": "Bearer iq-wrong"}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    page = client.get("/metrics")
    assert page.status_code == 200 and page.mimetype == "text/plain"
    after = samples(page.get_data(as_text=True))

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("flask_http_request_total", method="POST", status="200") == 2
    assert grew("flask_http_request_duration_seconds_count", path="/v1/chat/completions") == 2
    assert grew("inferq_ttft_seconds_count", endpoint="chat") == 2
    assert grew("inferq_request_duration_seconds_count", endpoint="chat", stream="true") == 1
    assert grew("inferq_request_duration_seconds_count", endpoint="chat", stream="false") == 1
    assert grew("inferq_auth_failures_total", reason="invalid_key") == 1
    assert grew("inferq_auth_failures_total", reason="missing_key") == 1
    assert value(after, "inferq_live_workers", model=SCRIPTED_MODEL) >= 1
    assert ("inferq_queue_depth", (("queue", f"inferq.{SCRIPTED_MODEL}"),)) in after
    assert ("inferq_queue_depth", (("queue", f"inferq.{SCRIPTED_MODEL}.batch"),)) in after
    # Bounded labels: no key, no job id anywhere on the page.
    text = page.get_data(as_text=True)
    assert TEST_KEY not in text and "iq-wrong" not in text and "chatcmpl" not in text


def test_rejections_are_counted_by_reason(client, app_config, scripted_worker):
    from api import create_app
    from tests.conftest import add_key

    before = samples(client.get("/metrics").get_data(as_text=True))
    key, _ = add_key(app_config["database_url"], daily_tokens=10, rpm=1)
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/chat/completions", json=chat("x"), headers=headers).status_code == 429  # quota
    assert client.post("/v1/chat/completions", json=chat("x"), headers=headers).status_code == 429  # rpm
    ghost = create_app({**app_config, "served_model_name": "ghost-model"}).test_client()
    assert ghost.post("/v1/chat/completions", json=chat("x", "ghost-model"), headers=AUTH).status_code == 503
    after = samples(client.get("/metrics").get_data(as_text=True))
    for reason in ("quota", "rate_limit", "no_worker"):
        assert value(after, "inferq_rejections_total", reason=reason) == \
            value(before, "inferq_rejections_total", reason=reason) + 1, reason


@pytest.fixture(scope="module")
def metrics_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A scripted worker with its metrics port and a two-process gunicorn API, logging JSON."""
    tmp = tmp_path_factory.mktemp("metrics")
    worker_port = free_port()
    worker = start_worker(redis_url, tmp, METRICS_MODEL, 60, ENGINE="scripted", LOG_FORMAT="json",
                          WORKER_METRICS_PORT=str(worker_port), MAX_NUM_SEQS="8", BATCH_SHARE="0.5")
    port = free_port()
    metrics_dir = tmp / "prometheus"  # one file per process and metric type: who served what
    env = base_env(redis_url, tmp, SERVED_MODEL_NAME=METRICS_MODEL, LOG_FORMAT="json",
                   PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    api = Process([sys.executable, "-m", "inferq.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "2"], env, tmp / "api.log")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{base}/health", timeout=1).is_success, 30, "API", api.proc)
    yield {"base": base, "worker_metrics": f"http://127.0.0.1:{worker_port}/metrics",
           "worker_log": worker.log_path, "api_log": api.log_path, "metrics_dir": metrics_dir}
    api.stop()
    worker.stop()


def models_requests_by_process(metrics_dir: object) -> dict[int, float]:
    """``GET /v1/models`` requests each gunicorn worker process counted, read from its own
    multiprocess file (``histogram_<pid>.db``) rather than from a scrape."""
    from prometheus_client.mmap_dict import MmapedDict

    served: dict[int, float] = {}
    for path in Path(str(metrics_dir)).glob("histogram_*.db"):
        pid = int(path.stem.removeprefix("histogram_"))
        for key, count, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            # Bucket counts are stored per bucket, not cumulated: their sum is the request count.
            if name == "flask_http_request_duration_seconds_bucket" and labels.get("path") == "/v1/models":
                served[pid] = served.get(pid, 0.0) + count
    return served


def test_multiprocess_api_metrics_add_up_across_gunicorn_workers(metrics_stack):
    base = metrics_stack["base"]
    before = sum(models_requests_by_process(metrics_stack["metrics_dir"]).values())
    with httpx.Client(base_url=str(base), headers=AUTH, timeout=30) as http:
        for i in range(12):
            # A fresh connection each time, so both gunicorn processes take some.
            assert httpx.get(f"{base}/v1/models", headers=AUTH).status_code == 200
            assert http.post("/v1/chat/completions", json=chat(f"m{i}", METRICS_MODEL)).status_code == 200
        extra = 0  # which process accepts a connection is the kernel's choice: insist, within reason
        while sum(n > 0 for n in models_requests_by_process(metrics_stack["metrics_dir"]).values()) < 2 \
                and extra < 200:
            assert httpx.get(f"{base}/v1/models", headers=AUTH).status_code == 200
            extra += 1
        pages = [samples(httpx.get(f"{base}/metrics").text) for _ in range(8)]
    served = models_requests_by_process(metrics_stack["metrics_dir"])
    assert len(served) == 2 and all(served.values()), f"not both gunicorn workers served: {served}"
    assert sum(served.values()) - before == 12 + extra
    assert all(value(page, "inferq_api_info", model=METRICS_MODEL) >= 1 for page in pages)
    for page in pages:  # whichever process answers, it reports every process's samples
        assert value(page, "flask_http_request_duration_seconds_count", path="/v1/models") >= 12
        assert value(page, "inferq_ttft_seconds_count", endpoint="chat") >= 12
        assert value(page, "inferq_request_duration_seconds_count", endpoint="chat") >= 12
        assert value(page, "inferq_live_workers", model=METRICS_MODEL) == 1
    counts = {value(page, "flask_http_request_duration_seconds_count", path="/v1/models") for page in pages}
    assert counts == {sum(served.values())}, f"scrapes disagree or miss a process: {counts}; {served}"


def test_worker_metrics(metrics_stack):
    base = str(metrics_stack["base"])
    before = samples(httpx.get(str(metrics_stack["worker_metrics"])).text)
    for i in range(3):  # streamed: a buffered answer publishes no deltas, only its end
        streamed = {**chat(f"w{i}", METRICS_MODEL), "stream": True}
        assert httpx.post(f"{base}/v1/chat/completions", json=streamed, headers=AUTH,
                          timeout=30).status_code == 200
    job = httpx.post(f"{base}/v1/jobs", headers=AUTH, timeout=30, json={
        "endpoint": "/v1/chat/completions", "body": chat("batchy", METRICS_MODEL)}).json()
    done = httpx.get(f"{base}/v1/jobs/{job['id']}?wait=20", headers=AUTH, timeout=30).json()
    assert done["status"] == "succeeded"
    after = samples(httpx.get(str(metrics_stack["worker_metrics"])).text)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("inferq_worker_jobs_total", priority="interactive", outcome="succeeded") == 3
    assert grew("inferq_worker_jobs_total", priority="batch", outcome="succeeded") == 1
    assert grew("inferq_queue_wait_seconds_count", priority="interactive") == 3
    assert grew("inferq_queue_wait_seconds_count", priority="batch") == 1
    # at least one round trip per stream (frames ready together go out in one)
    assert grew("inferq_worker_publish_seconds_count") >= 3
    assert value(after, "inferq_worker_slots") == 8
    assert value(after, "inferq_worker_batch_slots") == 4
    assert value(after, "inferq_worker_active_jobs", priority="interactive") == 0


def _json_lines(path: object) -> list[dict[str, object]]:
    lines = []
    for line in Path(str(path)).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return lines


def test_one_request_id_from_the_api_to_the_worker_logs(metrics_stack):
    request_id = f"trace-{time.time_ns()}"
    resp = httpx.post(f"{metrics_stack['base']}/v1/chat/completions", json=chat("trace me", METRICS_MODEL),
                      headers={**AUTH, "X-Request-ID": request_id}, timeout=30)
    assert resp.status_code == 200 and resp.headers["X-Request-ID"] == request_id
    job_id = resp.json()["id"].removeprefix("chatcmpl-")

    def worker_line() -> dict[str, object] | None:
        return next((r for r in _json_lines(metrics_stack["worker_log"])
                     if r.get("request_id") == request_id), None)

    wait_for(worker_line, 10, "worker log line with the request id")
    line = worker_line()
    assert line is not None
    assert line["job_id"] == job_id and line["level"] == "INFO" and "succeeded" in str(line["message"])
    assert {"time", "logger", "process"} <= line.keys()
    wait_for(lambda: any(r.get("request_id") == request_id for r in _json_lines(metrics_stack["api_log"])),
             10, "API access log line with the request id")
