"""A real browser (headless Debian chromium) on Flower and on the API's probes and metrics.

Runs the scripted worker (test double), an API and Flower as real processes and lets
chromium load each page, run its scripts and dump the resulting DOM.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import SCRIPTED_MODEL, Process, base_env, free_port, start_api, wait_for

pytestmark = pytest.mark.slow


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after chromium ran its scripts (a few seconds of virtual time)."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: run `make install` (Debian chromium, chromium-driver)")
    result = subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def stack(redis_url: str, scripted_worker: Process, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, str]]:
    """An API and Flower beside the session's scripted worker."""
    tmp = tmp_path_factory.mktemp("browser")
    api, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL)
    port = free_port()
    argv = [sys.executable, "-m", "inferq.cli", "flower", "--port", str(port)]
    flower = Process(argv, base_env(redis_url, tmp), tmp / "flower.log")
    flower_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{flower_url}/healthcheck", timeout=2).text == "OK", 30, "Flower",
                 flower.proc)
        yield {"api": base, "flower": flower_url, "tmp": str(tmp)}
    finally:
        flower.stop()
        api.stop()


def test_flower_shows_the_live_worker(stack: dict[str, str], scripted_worker: Process) -> None:
    # inferq worker names its Celery node <served model>.<pid>@<host>.
    name = f"{SCRIPTED_MODEL}.{scripted_worker.proc.pid}@{socket.gethostname()}"
    # Flower lists a worker once it has seen one of its heartbeat events (every 2 s).
    wait_for(lambda: name in httpx.get(f"{stack['flower']}/workers", timeout=5).text, 30, "worker in Flower")
    dom = chromium_dom(f"{stack['flower']}/workers", Path(stack["tmp"]) / "chromium-flower")
    assert "<title>Workers · Flower</title>" in dom
    # Flower's scripts (DataTables) re-render the table: one row per worker, with a status badge.
    rows = re.findall(r"<tr[^>]*>.*?</tr>", dom, re.S)
    [row] = [r for r in rows if f'title="{name}"' in r]
    assert re.search(r'<span class="badge[^"]*">Online</span>', row), row


def test_api_ready_and_metrics_in_a_browser(stack: dict[str, str]) -> None:
    profile = Path(stack["tmp"]) / "chromium-api"
    ready = chromium_dom(f"{stack['api']}/ready", profile)
    body = json.loads(re.sub(r"<[^>]+>", "", ready))  # chromium wraps JSON in <pre>
    assert body == {"status": "ready", "models": [SCRIPTED_MODEL]}

    metrics = chromium_dom(f"{stack['api']}/metrics", profile)
    assert f'inferq_live_workers{{model="{SCRIPTED_MODEL}"}} 1.0' in metrics
    assert f'inferq_queue_depth{{queue="inferq.{SCRIPTED_MODEL}"}}' in metrics
    assert "flask_http_request_duration_seconds_bucket" in metrics  # the /ready above was timed
