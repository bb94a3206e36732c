"""Start a worker and an API server as child processes, for benchmarks.

Benchmarks run on a private ``redis-server`` and a private temporary database
(:func:`private_stack`), never on the ambient ``REDIS_URL``/``DATABASE_URL``: a
shared Redis would let another live worker of the same model take the benchmark's
jobs, and a shared database would keep usage between runs. :func:`running_stack`
refuses to start next to a live worker of the same model on its Redis. The processes
are started by :mod:`inferq.launcher`, as ``inferq run`` and the tests start theirs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from config import Settings
from inferq.launcher import (
    Process,
    api_argv,
    coordinator_argv,
    free_port,
    http_ok,
    inferq_argv,
    redis_server,
    stop_all,
    wait_for,
)
from queueing import liveness

BENCH_KEY = "iq-bench-0123456789abcdef0123"


class LiveWorkerError(RuntimeError):
    """Another live worker serves the benchmark's model on its Redis: it would take the jobs."""


def refuse_live_worker(env: dict[str, str]) -> None:
    """Raise :class:`LiveWorkerError` if a live worker already serves ``env``'s model on ``env``'s Redis
    (``REDIS_URL`` and ``SERVED_MODEL_NAME`` of ``env``, else the settings' defaults)."""
    defaults = Settings()
    url = env.get("REDIS_URL") or defaults.redis_url
    model = env.get("SERVED_MODEL_NAME") or defaults.served_model_name
    try:
        live = liveness.live_models(redis.Redis.from_url(url, decode_responses=True, socket_timeout=5))[model]
    except redis.ConnectionError:
        return  # nothing answers there, so no worker either; the stack's own start reports it
    if live:
        where = urllib.parse.urlsplit(url)
        raise LiveWorkerError(
            f"{live} live worker(s) already serve {model!r} on the Redis at {where.hostname}:{where.port}: "
            "they would take this benchmark's jobs. "
            "Benchmarks start their own redis-server (benchmarks.stack.private_stack); stop that worker, "
            "or point REDIS_URL elsewhere.")


@dataclass
class PrivateStack:
    """A running private stack: its base URL, Redis URL, and processes (worker, API, coordinator,
    redis-server)."""

    base: str
    redis_url: str
    database_url: str
    workdir: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: The environment the worker and the API were started with (Celery's process title
    #: overwrites /proc/<pid>/environ, so it cannot be read back from the worker).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def worker(self) -> subprocess.Popen[bytes]:
        return self.procs[0]

    @property
    def api(self) -> subprocess.Popen[bytes]:
        return self.procs[1]

    @property
    def coordinator(self) -> subprocess.Popen[bytes]:
        return self.procs[2]

    @property
    def redis(self) -> subprocess.Popen[bytes]:
        return self.procs[3]


@contextmanager
def private_stack(port: int | None = None, ready_timeout: float = 600, api_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> Iterator[PrivateStack]:
    """A private redis-server and a temporary SQLite database and files directory, then a worker, a
    one-process API and a coordinator on them (:func:`running_stack`, with the settings ``env``);
    everything is gone afterwards."""
    with ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="inferq-bench-"))
        private_redis = stack.enter_context(redis_server())
        database_url = f"sqlite:///{workdir}/bench.db"
        procs: list[subprocess.Popen[bytes]] = []
        settings = {"FILES_DIR": os.path.join(workdir, "files"), **(env or {}),
                    "REDIS_URL": private_redis.url, "DATABASE_URL": database_url}
        base = stack.enter_context(
            running_stack(port or free_port(), ready_timeout, api_args, procs, **settings))
        yield PrivateStack(base, private_redis.url, database_url, workdir, [*procs, private_redis.proc],
                           child_environment(settings))


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment :func:`running_stack` starts the worker and the API with."""
    return {**os.environ, "API_KEYS": BENCH_KEY, "WORKER_METRICS_PORT": "0", "COORDINATOR_METRICS_PORT": "0",
            **env}


def log_path(name: str) -> Path | None:
    """Where a benchmark process's output goes: ``$INFERQ_BENCH_LOGS/NAME.log`` if set, else nowhere."""
    log_dir = os.environ.get("INFERQ_BENCH_LOGS")
    return Path(log_dir, f"{name}.log") if log_dir else None


def bench_process(argv: list[str], env: dict[str, str], name: str) -> Process:
    """``argv`` in the benchmark's process group (a Ctrl-C reaches it), logging as :func:`log_path` says."""
    return Process(argv, env, log_path(name), new_session=False)


@contextmanager
def running_stack(port: int, ready_timeout: float = 600, api_args: tuple[str, ...] = (),
                  procs: list[subprocess.Popen[bytes]] | None = None, **env: str) -> Iterator[str]:
    """A worker, a one-process API on ``port`` with ``BENCH_KEY`` and a coordinator; yields the base
    URL once ready.

    ``api_args`` are added to ``inferq api``; ``procs``, if given, receives the
    worker, API and coordinator processes (in that order).
    """
    child_env = child_environment(env)
    refuse_live_worker(child_env)
    started = [bench_process(inferq_argv("worker", "--loglevel", "WARNING"), child_env, "worker"),
               bench_process(api_argv(port, *api_args), child_env, "api"),
               bench_process(coordinator_argv(), child_env, "coordinator")]
    if procs is not None:
        procs.extend(process.proc for process in started)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(http_ok(f"{base}/ready", timeout=2), ready_timeout, "worker + API", interval=0.5)
        yield base
    finally:
        stop_all(started, 120)
