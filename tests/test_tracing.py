"""OpenTelemetry export (console exporter): one trace from the API request to the worker's job.

Real processes: gunicorn, a Celery worker with the scripted engine (test double), real Redis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TEST_KEY, start_api, start_worker, wait_for

MODEL = "traced-model"
OTEL = {"OTEL_TRACES_EXPORTER": "console", "LOG_FORMAT": "json"}


def spans(path: Path) -> list[dict[str, Any]]:
    """The spans the console exporter printed (indented JSON objects) among a log's lines."""
    text, found, decoder = path.read_text(errors="replace"), [], json.JSONDecoder()
    start = text.find('{\n    "name"')
    while start != -1:
        try:
            span, end = decoder.raw_decode(text, start)
            found.append(span)
        except json.JSONDecodeError:
            end = start + 1
        start = text.find('{\n    "name"', end)
    return found


def test_the_worker_span_joins_the_api_request_trace(redis_url, tmp_path):
    worker = start_worker(redis_url, tmp_path, MODEL, 60, ENGINE="scripted", **OTEL)
    api, base = start_api(redis_url, tmp_path, SERVED_MODEL_NAME=MODEL, **OTEL)
    try:
        body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {TEST_KEY}"})
        assert resp.status_code == 200
        job_id = resp.json()["id"].removeprefix("chatcmpl-")

        def pair() -> tuple[dict[str, Any], dict[str, Any]] | None:
            request = next((s for s in spans(api.log_path) if s["name"] == "inferq.chat"), None)
            job = next((s for s in spans(worker.log_path) if s["name"] == "inferq.job"
                        and s["attributes"].get("inferq.job_id") == job_id), None)
            return (request, job) if request and job else None

        wait_for(pair, 15, "both spans exported")
        found = pair()
        assert found is not None
        request, job = found
    finally:
        api.stop()
        worker.stop()
    assert job["context"]["trace_id"] == request["context"]["trace_id"]
    assert job["parent_id"] == request["context"]["span_id"]
    assert job["attributes"]["inferq.outcome"] == "succeeded"
    assert job["attributes"]["gen_ai.usage.output_tokens"] == 3
    assert request["resource"]["attributes"]["service.name"] == "inferq-api"
    assert job["resource"]["attributes"]["service.name"] == "inferq-worker"
