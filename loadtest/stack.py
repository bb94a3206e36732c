"""Start a worker and an API server as child processes, for benchmarks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis

BENCH_KEY = "iq-bench-0123456789abcdef0123"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    """A private, empty redis-server on a free port (nothing persisted); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make install puts it there)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def running_stack(port: int, ready_timeout: float = 600, api_args: tuple[str, ...] = (),
                  procs: list[subprocess.Popen[bytes]] | None = None, **env: str) -> Iterator[str]:
    """A worker and a one-process API on ``port`` with ``BENCH_KEY``; yields the base URL once ready.

    ``api_args`` are added to ``inferq api``; ``procs``, if given, receives the
    worker and API processes (in that order).
    """
    child_env = {**os.environ, "API_KEYS": BENCH_KEY, "WORKER_METRICS_PORT": "0", **env}
    commands = [
        ["worker", "--loglevel", "WARNING"],
        ["api", "--port", str(port), "--workers", "1", "--host", "127.0.0.1", *api_args],
    ]
    log_dir = os.environ.get("INFERQ_BENCH_LOGS")  # where the worker's and API's output goes, if set

    def output(name: str) -> Any:
        return open(os.path.join(log_dir, f"{name}.log"), "wb") if log_dir else subprocess.DEVNULL

    started = [subprocess.Popen([sys.executable, "-m", "inferq.cli", *command], env=child_env,
                                stdout=output(command[0]), stderr=subprocess.STDOUT) for command in commands]
    if procs is not None:
        procs.extend(started)
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
        for p in started:
            p.terminate()
        for p in started:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
