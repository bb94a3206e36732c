"""The engine dies with its worker (``workers.engine_reaper``): however the worker ends, the
processes it started end within seconds, and a new worker starts and serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import REAL_MODEL_DIR, REAL_WORKER_ENV, TEST_KEY, start_api, start_worker, wait_for
from workers import engine_reaper

# A parent that starts a long-lived child (as vLLM starts its engine core), then waits.
PARENT = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")


def _gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def test_a_killed_parents_children_are_reaped() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    reaper = engine_reaper.start(parent.pid, interval=0.1, grace=1.0)
    try:
        wait_for(lambda: len(psutil.Process(parent.pid).children()) == 1, 10, "the child")
        child = psutil.Process(parent.pid).children()[0]
        time.sleep(0.3)  # the reaper has seen it
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: _gone([child]), 5, "the orphaned child to be reaped")
        assert reaper.wait(5) == 0  # and the reaper ends with it
    finally:
        for process in (parent, reaper):
            if process.poll() is None:
                process.kill()


def test_an_idle_reaper_looks_rarely_yet_reaps_at_once() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    reaper = engine_reaper.start(parent.pid, interval=0.05, grace=1.0, max_interval=60)
    try:
        wait_for(lambda: len(psutil.Process(parent.pid).children()) == 1, 10, "the child")
        child = psutil.Process(parent.pid).children()[0]
        time.sleep(1.0)  # the children stopped changing: the reaper's looks grow far apart
        watcher = psutil.Process(reaper.pid)
        before = sum(watcher.cpu_times()[:2])
        time.sleep(4.0)
        spent = sum(watcher.cpu_times()[:2]) - before
        # Looking every 0.05 s all along would cost about 0.3 s of CPU here.
        assert spent < 0.05, f"an idle reaper spent {spent * 1000:.0f} ms of CPU in 4 s"
        parent.send_signal(signal.SIGKILL)  # now, while its next look is up to a minute away
        parent.wait()
        wait_for(lambda: _gone([child]), 5, "the orphaned child to be reaped at once")
        assert reaper.wait(5) == 0
    finally:
        for process in (parent, reaper):
            if process.poll() is None:
                process.kill()


@pytest.mark.slow
def test_a_sigkilled_workers_engine_ends_and_a_new_worker_serves(redis_url, tmp_path) -> None:
    if not (REAL_MODEL_DIR / "config.json").exists():
        pytest.fail("the default model is not prepared: run `make model`")
    model = "reaper-model"
    env = {k: v for k, v in REAL_WORKER_ENV.items() if k != "SERVED_MODEL_NAME"}
    worker = start_worker(redis_url, tmp_path, model, 300, **env)
    engine = [p for p in psutil.Process(worker.proc.pid).children(recursive=True)
              if "engine_reaper" not in " ".join(p.cmdline())]
    assert engine, "vLLM's engine runs in child processes"
    os.kill(worker.proc.pid, signal.SIGKILL)  # the worker's main process only, as the OOM killer would
    worker.proc.wait()
    killed = time.monotonic()
    wait_for(lambda: _gone(engine), 10, "the engine processes to end")
    print(f"engine processes {[p.pid for p in engine]} gone {time.monotonic() - killed:.1f} s after the kill")
    worker.stop()

    again = start_worker(redis_url, tmp_path, model, 300, **env)
    api, base = start_api(redis_url, tmp_path, SERVED_MODEL_NAME=model)
    try:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {TEST_KEY}"},
                            timeout=120, json={"model": model, "max_tokens": 8, "temperature": 0,
                                               "messages": question})
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    finally:
        api.stop()
        again.stop(60)
