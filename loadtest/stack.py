"""Start a worker and an API server as child processes, for benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

BENCH_KEY = "iq-bench-0123456789abcdef0123"


@contextmanager
def running_stack(port: int, ready_timeout: float = 600, **env: str) -> Iterator[str]:
    """A worker and a one-process API on ``port`` with ``BENCH_KEY``; yields the base URL once ready."""
    child_env = {**os.environ, "API_KEYS": BENCH_KEY, "WORKER_METRICS_PORT": "0", **env}
    commands = [
        ["worker", "--loglevel", "WARNING"],
        ["api", "--port", str(port), "--workers", "1", "--host", "127.0.0.1"],
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "inferq.cli", *command], env=child_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for command in commands]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker + API not ready after {ready_timeout}s")
            time.sleep(0.5)
        yield base
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
