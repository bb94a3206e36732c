"""Start and stop the processes of a private stack: a redis-server, ``inferq worker``, ``inferq api``.

One launcher for the three places that start a stack: ``inferq run`` (which runs Redis under
its supervisor and takes only the redis-server command line and the PING check from here), the
benchmarks (``benchmarks/stack.py``) and the tests (``tests/conftest.py``). Each keeps its own
timeouts, environment and log files; the pieces here are the ones they share:

- :func:`free_port`, :func:`wait_for` (poll until ready, or fail early if the process exited);
- :func:`redis_server_argv`, :func:`redis_answers` and :func:`redis_server` (a throwaway
  redis-server on a free port, ready when it answers PING, stopped on exit);
- :func:`inferq_argv` and :class:`Process` (a child with its log file, stopped by SIGTERM then
  SIGKILL), :func:`stop_all`, and :func:`started` (a process once it is ready, or stopped).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import redis

from queueing import keys, liveness
from queueing.connections import tls_options

#: How often :func:`wait_for` asks, in seconds.
POLL = 0.2
#: Seconds a private redis-server has to answer PING.
REDIS_READY_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen[bytes] | None = None, interval: float = POLL) -> None:
    """Return once ``predicate()`` is truthy (an exception counts as not yet); raise
    ``TimeoutError`` after ``timeout`` seconds, or ``RuntimeError`` as soon as ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s")


# --- Redis -------------------------------------------------------------------------------------


def redis_server_argv(port: int, data_dir: Path | str, *, append_only: bool = False,
                      binary: str = "redis-server") -> list[str]:
    """A redis-server on 127.0.0.1:``port`` keeping its files in ``data_dir``: no snapshots, and
    an append-only file (fsync once a second) only when ``append_only``."""
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir), "--save", ""]
    if append_only:
        return [*argv, "--appendonly", "yes", "--appendfsync", "everysec"]
    return [*argv, "--appendonly", "no"]


def redis_answers(url: str, ca_file: str = "") -> bool:
    """True when Redis at ``url`` answers PING (over TLS for ``rediss://``, verified with ``ca_file``)."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, **tls_options(url, ca_file)).ping())
    except redis.RedisError:
        return False


@dataclass(frozen=True)
class RedisServer:
    """A running private redis-server: its URL and process."""

    url: str
    proc: subprocess.Popen[bytes]


@contextmanager
def redis_server(data_dir: Path | str | None = None) -> Iterator[RedisServer]:
    """A private, empty redis-server on a free port, nothing persisted (its files in ``data_dir``,
    else in a temporary directory); yields it once it answers PING, stops it on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make install puts it there)")
    port = free_port()
    with ExitStack() as cleanup:
        workdir = data_dir if data_dir is not None else cleanup.enter_context(tempfile.TemporaryDirectory())
        proc = subprocess.Popen(redis_server_argv(port, workdir, binary=binary),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_for(lambda: redis_answers(url), REDIS_READY_TIMEOUT, "redis-server", proc, interval=0.05)
            yield RedisServer(url, proc)
        finally:
            proc.terminate()
            proc.wait(10)


# --- inferq processes ----------------------------------------------------------------------------


def inferq_argv(*args: str) -> list[str]:
    """``inferq ARGS`` run by this Python: ``inferq_argv("worker", "--loglevel", "WARNING")``."""
    return [sys.executable, "-m", "inferq.cli", *args]


def api_argv(port: int, *args: str, workers: int = 1) -> list[str]:
    """``inferq api`` on 127.0.0.1:``port`` with ``workers`` gunicorn workers, then ``args``."""
    return inferq_argv("api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), *args)


def coordinator_argv(*args: str) -> list[str]:
    """``inferq coordinator`` (the API's background work), then ``args``."""
    return inferq_argv("coordinator", *args)


def coordinator_ready(redis_url: str) -> Callable[[], bool]:
    """A readiness check: a coordinator has made its consumer groups on ``redis_url``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def ready() -> bool:
        try:
            groups = client.xinfo_groups(keys.BATCH_LINES_STREAM)
            return any(group["name"] == keys.BATCH_COLLECTOR_GROUP for group in groups)
        except redis.ResponseError:  # no stream yet
            return False
    return ready


def worker_live(redis_url: str, model: str) -> Callable[[], bool]:
    """A readiness check: some worker of ``model`` beats on ``redis_url``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    return lambda: liveness.live_models(client)[model] > 0


def http_ok(url: str, timeout: float = 1) -> Callable[[], bool]:
    """A readiness check: GET ``url`` answers 2xx (``/health``: the API is up; ``/ready``: a worker too)."""
    return lambda: httpx.get(url, timeout=timeout).is_success


class Process:
    """A child process with its log file (``None``: its output is discarded), stopped by SIGTERM
    then SIGKILL.

    With ``new_session`` it leads a process group of its own, which ``stop`` signals whole (a
    gunicorn master and its workers, a worker and its engine), and a Ctrl-C in the terminal does
    not reach it; without, it shares the caller's group and only the child itself is signalled.
    """

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path | None = None, *,
                 cwd: Path | str | None = None, new_session: bool = True):
        self.log_path = log_path
        self._log: IO[bytes] | None = log_path.open("wb") if log_path is not None else None
        self._group = new_session
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, cwd=cwd, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        """SIGTERM, if it still runs."""
        self._signal(signal.SIGTERM)

    def finish(self, timeout: float) -> None:
        """Wait ``timeout`` seconds for it to exit, then SIGKILL; close its log."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        if self._log is not None:
            self._log.close()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        stop_all([self], timeout)

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of its log (empty without one)."""
        if self.log_path is None:
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _signal(self, signum: signal.Signals) -> None:
        if self.proc.poll() is not None:
            return
        if self._group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)


def stop_all(processes: Iterable[Process], timeout: float) -> None:
    """SIGTERM every process at once, then give each ``timeout`` seconds before SIGKILL."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.finish(timeout)


P = TypeVar("P", bound=Process)


def started(process: P, ready: Callable[[], Any], timeout: float, what: str) -> P:
    """``process`` once ``ready()`` holds (see :func:`wait_for`). If it never does, or the wait is
    interrupted, the process is stopped and its log's tail printed before the error goes on: an
    engine is never left running."""
    try:
        wait_for(ready, timeout, what, process.proc)
    except BaseException:  # pytest-timeout's Failed and KeyboardInterrupt too
        process.stop()
        print(process.log_tail())
        raise
    return process
