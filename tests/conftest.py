"""Fixtures: a private redis-server, real worker processes, the app and clients.

Every test session starts its own ``redis-server`` on a free port (hermetic and
parallel-safe). Workers are real processes running ``inferq worker``; the fast
tests use the scripted engine (a named test double), the slow ones vLLM. The processes
are started by :mod:`inferq.launcher`, as ``inferq run`` and the benchmarks start theirs.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from inferq import launcher
from inferq.launcher import (
    api_argv,
    coordinator_argv,
    coordinator_ready,
    http_ok,
    inferq_argv,
    started,
    worker_live,
)
from inferq.launcher import free_port as free_port  # tests import it from here
from inferq.launcher import wait_for as wait_for  # tests import it from here

pytest_plugins = ["tests.sql_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "iq-test-0123456789abcdef0123"
SCRIPTED_MODEL = "scripted-model"
REAL_MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
REAL_MODEL = "SmolLM2-135M-Instruct"
#: The real worker's settings; the differential test gives vLLM's own server the same ones.
REAL_WORKER_ENV = {
    "MODEL_NAME": str(REAL_MODEL_DIR), "SERVED_MODEL_NAME": REAL_MODEL, "MAX_NUM_SEQS": "16",
    "MAX_MODEL_LEN": "1024", "KV_CACHE_SPACE_GIB": "1", "TOOL_CALL_PARSER": "hermes",
    "ENABLE_AUTO_TOOL_CHOICE": "true",
}


class Process(launcher.Process):
    """A child process run from the repository root, in a session of its own, with its log file;
    stopped by SIGTERM then SIGKILL to its whole group."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        super().__init__(argv, env, log_path, cwd=ROOT)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server on a free port, stopped on exit; yields its URL."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make install` (it installs it)")
    with launcher.redis_server(workdir) as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server owned by this test session, on a free port.

    A coordinator drains the shared usage and batch-line streams into its own database, so no
    coordinator on this server outlives the test that started it; a module whose stack needs
    one for longer overrides this fixture with its own ``redis_server``.
    """
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def base_env(redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV",))}
    env.update({
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{tmp / 'inferq.db'}",
        "API_KEYS": TEST_KEY,
        "WORKER_HEARTBEAT_INTERVAL": "1",
        "WORKER_HEARTBEAT_TTL": "3",
        "WORKER_METRICS_PORT": "0",
        "AUTH_FAILURE_LIMIT": "1000/minute",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def start_worker(redis_url: str, tmp: Path, model: str, timeout: float, **extra: str) -> Process:
    env = base_env(redis_url, tmp, **{"SERVED_MODEL_NAME": model, **extra})
    worker = Process(inferq_argv("worker"), env, tmp / f"worker-{model}.log")
    return started(worker, worker_live(redis_url, model), timeout, f"worker for {model}")


def add_key(database_url: str, **limits: Any) -> tuple[str, str]:
    """Insert a key with limits into the app's database; returns (key, public id)."""
    from api.accounts.auth import hash_key
    from api.db import ApiKey, Database
    from config import Settings

    db = Database(Settings(database_url=database_url))
    db.create_schema()
    key, public_id = f"iq-{secrets.token_urlsafe(24)}", f"key_{secrets.token_hex(8)}"
    with db.sessions.begin() as session:
        session.add(ApiKey(public_id=public_id, name="test-key", key_hash=hash_key(key),
                           prefix=key[:6] + "...", **limits))
    return key, public_id


def start_api(redis_url: str, tmp: Path, **extra: str) -> tuple[Process, str]:
    port = free_port()
    env = base_env(redis_url, tmp, **extra)
    api = Process(api_argv(port), env, tmp / f"api-{port}.log")
    base = f"http://127.0.0.1:{port}"
    return started(api, http_ok(f"{base}/health"), 30, "API"), base


def start_coordinator(redis_url: str, tmp: Path, **extra: str) -> Process:
    """``inferq coordinator`` (usage ledger, batch collection and dispatch) beside an API of ``tmp``."""
    env = base_env(redis_url, tmp, **{"COORDINATOR_METRICS_PORT": "0", "COORDINATOR_INTERVAL": "1", **extra})
    coordinator = Process(coordinator_argv(), env, tmp / f"coordinator-{free_port()}.log")
    return started(coordinator, coordinator_ready(redis_url), 30, "coordinator")


@pytest.fixture(scope="session")
def scripted_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A real Celery worker process hosting the scripted engine (test double)."""
    tmp = tmp_path_factory.mktemp("scripted-worker")
    worker = start_worker(redis_url, tmp, SCRIPTED_MODEL, 60, ENGINE="scripted", MAX_NUM_SEQS="32")
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def real_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One real vLLM worker (SmolLM2, vLLM metrics on ``metrics``) and one API for the session."""
    if not (REAL_MODEL_DIR / "config.json").exists():
        pytest.fail("the default model is not prepared: run `make model`")
    tmp = tmp_path_factory.mktemp("real")
    metrics_port = free_port()
    worker = start_worker(redis_url, tmp, REAL_MODEL, 300, WORKER_METRICS_PORT=str(metrics_port),
                          **{k: v for k, v in REAL_WORKER_ENV.items() if k != "SERVED_MODEL_NAME"})
    api, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=REAL_MODEL, FILES_DIR=str(tmp / "files"))
    yield {"base": base, "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "tmp": str(tmp)}
    api.stop()
    worker.stop(60)


@pytest.fixture
def real_coordinator(redis_url: str, real_stack: dict[str, str]) -> Iterator[Process]:
    """A coordinator for ``real_stack``'s database, for one test only: a coordinator drains the
    session Redis's shared streams into its own database, so none outlives the test that needs it."""
    tmp = Path(real_stack["tmp"])
    coordinator = start_coordinator(redis_url, tmp, SERVED_MODEL_NAME=REAL_MODEL,
                                    FILES_DIR=str(tmp / "files"))
    yield coordinator
    coordinator.stop()


@pytest.fixture(scope="module")
def two_apis(redis_url: str, scripted_worker: Process, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Path, list[str]]]:
    """Two gunicorn API servers sharing Redis and one SQLite database."""
    tmp = tmp_path_factory.mktemp("two-apis")
    procs = [start_api(redis_url, tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL) for _ in range(2)]
    yield tmp, [base for _, base in procs]
    for proc, _ in procs:
        proc.stop()


@pytest.fixture
def app_config(redis_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "database_url": f"sqlite:///{tmp_path / 'api.db'}",
        "api_keys": TEST_KEY,
        "served_model_name": SCRIPTED_MODEL,
        "queue_timeout": 10.0,
        "idle_timeout": 5.0,
        "files_dir": str(tmp_path / "files"),
        "auth_failure_limit": "1000/minute",  # tests share 127.0.0.1; test_ratelimit lowers it
    }


@pytest.fixture
def app(app_config: dict[str, Any]) -> Any:
    from api import create_app

    flask_app = create_app(app_config)
    flask_app.config["TESTING"] = True
    return flask_app


@contextmanager
def coordinating(app: Any, interval: float = 0.5) -> Iterator[Any]:
    """The app's background work on threads of this process while the block runs, as
    ``inferq coordinator`` runs it (a pass over the batches every ``interval`` seconds)."""
    from api.coordinator import Coordinator

    background = Coordinator(app.extensions["inferq"], interval=interval)
    background.start()
    try:
        yield background
    finally:
        background.stop()


@pytest.fixture
def coordinator(app: Any) -> Iterator[Any]:
    """:func:`coordinating` the test's app for the whole test."""
    with coordinating(app) as background:
        yield background


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TEST_KEY}"}
