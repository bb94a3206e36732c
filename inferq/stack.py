"""``inferq run``: the whole stack on one machine, in the foreground.

Ensures a development key, the default model and a reachable Redis (starting a
private one when none answers), prints the URLs, then runs the Procfile's
processes (worker, API, Flower, GPU exporter) under honcho's process manager
with prefixed logs. Ctrl-C stops them gracefully; a Redis started here is
stopped only after they have all exited, so their last Redis calls succeed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import click
import psutil
import redis
from honcho import environ
from honcho.compat import ProcessManager
from honcho.manager import Manager
from honcho.printer import Printer
from rich.console import Console

from config import get_settings, logs
from workers.model_prep import (
    ModelPrepError,
    find_packaged_gguf,
    is_default_model,
    needs_default_model,
    prepare_from_gguf,
)

console = Console(stderr=True)

PROCESSES = ("worker", "api", "flower", "gpu-monitor")
# Seconds beyond API_GRACEFUL_TIMEOUT that processes get to stop before SIGKILL
# (Celery's warm shutdown, the worker's engine shutdown).
STOP_MARGIN = 15
#: Where a running ``inferq run`` keeps its pid, for ``inferq stop`` (relative to where it runs).
PID_FILE = Path("data/inferq-run.pid")


def ensure_dev_key(env_file: Path) -> str:
    """The first bootstrap key; creates a random one in ``.env`` when none is set."""
    keys = get_settings().bootstrap_keys
    if keys:
        return keys[0]
    key = f"iq-dev-{secrets.token_urlsafe(24)}"
    with env_file.open("a", encoding="utf-8") as f:
        f.write(f"\n# development key created by `inferq run`\nAPI_KEYS={key}\n")
    os.environ["API_KEYS"] = key
    get_settings.cache_clear()
    console.print(f"[green]created a development API key in {env_file}[/]")
    return key


def redis_reachable(url: str) -> bool:
    """True when Redis at ``url`` answers PING."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_model() -> None:
    """Prepare the packaged default model when MODEL_NAME is its directory and it is not ready.

    Any other MODEL_NAME (your own model directory, a hub id) is used as it is:
    nothing is written there.
    """
    s = get_settings()
    if s.engine != "vllm":
        return
    if needs_default_model(s.model_name):
        console.print(f"preparing the default model into {s.model_name} (once)")
        logs.configure("INFO", "text")
        try:
            prepare_from_gguf(find_packaged_gguf(), Path(s.model_name))
        except ModelPrepError as exc:
            raise click.ClickException(str(exc)) from exc
    elif not is_default_model(s.model_name) and not Path(s.model_name).is_dir():
        console.print(
            f"MODEL_NAME={s.model_name} is not a local directory: vLLM fetches it as a hub id "
            f"(download it once instead: inferq download-model {s.model_name} --target models/NAME)",
            style="yellow", markup=False, highlight=False)


class LeaderFirst(ProcessManager):
    """SIGTERM to each process only, SIGKILL to its whole group.

    honcho signals the process group, so a worker's vLLM EngineCore would get SIGTERM
    at the same moment as the worker and die under the requests Celery's warm shutdown
    is still finishing. The leader stops its own children in order instead (the worker
    its engine, gunicorn its workers); the final SIGKILL still reaches every one.
    """

    def terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.kill(pid, signal.SIGTERM)


class GracefulManager(Manager):
    """honcho's Manager, waiting ``kill_wait`` seconds after SIGTERM before SIGKILL.

    Manager.loop SIGKILLs whatever still runs 5 s (honcho's KILL_WAIT) after the
    first process stops: shorter than Celery's warm shutdown and gunicorn's
    graceful timeout. Past that point the loop calls ``kill`` on every turn; this
    lets it through only once ``kill_wait`` (longer than KILL_WAIT) has passed
    since the first ``terminate``.
    """

    def __init__(self, printer: Printer, kill_wait: float) -> None:
        super().__init__(printer)
        self.kill_wait = kill_wait
        self._stopping_since: float | None = None
        self._procmgr = LeaderFirst()

    def terminate(self) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
            console.print(f"stopping: waiting up to {self.kill_wait:g} s for the processes to exit",
                          highlight=False)
        super().terminate()

    def kill(self) -> None:
        if self._stopping_since is not None and time.monotonic() - self._stopping_since >= self.kill_wait:
            super().kill()


def child_env(env_file: Path) -> dict[str, str]:
    """The processes' environment: ours, plus ``env_file`` entries we do not set ourselves
    (the same precedence as the settings: the environment wins over ``.env``)."""
    env = dict(os.environ)
    if env_file.exists():
        for name, value in environ.parse(env_file.read_text(encoding="utf-8")).items():
            env.setdefault(name, value)
    return env


@contextmanager
def private_redis(port: int) -> Iterator[None]:
    """A redis-server for this run, stopped when the block ends.

    It runs in its own session, so the terminal's Ctrl-C reaches only ``inferq
    run``, which stops it after the processes that use it have exited.
    """
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--loglevel", "warning"],
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_reachable(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(f"redis-server did not start on port {port}")
            time.sleep(0.1)
        console.print(f"redis-server started (pid {proc.pid}, port {port})", highlight=False)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        console.print("redis-server stopped", highlight=False)


def run_processes(procfile: Path, names: tuple[str, ...], env: dict[str, str], kill_wait: float) -> int:
    """Run ``names`` from ``procfile`` under honcho until they stop; their exit code."""
    commands = environ.parse_procfile(procfile.read_text(encoding="utf-8")).processes
    missing = [n for n in names if n not in commands]
    if missing:
        raise click.ClickException(f"{procfile} has no {', '.join(missing)} process")
    manager = GracefulManager(Printer(sys.stdout), kill_wait)
    for name in names:
        manager.add_process(name, commands[name], env=env)
    manager.loop()
    return int(manager.returncode or 0)


@click.command("run")
@click.option("--procfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("Procfile"), show_default=True)
def run(procfile: Path) -> None:
    """Run worker, API, Flower and the GPU exporter together (and Redis if none is reachable).

    Logs are plain text here unless LOG_FORMAT says otherwise (deployments log JSON).
    Ctrl-C stops everything gracefully (API_GRACEFUL_TIMEOUT plus a margin, then SIGKILL).
    """
    key = ensure_dev_key(Path(".env"))
    s = get_settings()
    ensure_model()
    if "log_format" not in s.model_fields_set:
        os.environ["LOG_FORMAT"] = "text"  # honcho prefixes each line with its process: keep it readable
    if "worker_task_events" not in s.model_fields_set:
        os.environ["WORKER_TASK_EVENTS"] = "true"  # Flower's task views, here where Flower runs
    redis_port = None
    if not redis_reachable(s.redis_url):
        url = urlparse(s.redis_url)
        if url.hostname not in ("127.0.0.1", "localhost") or not shutil.which("redis-server"):
            raise click.ClickException(f"Redis at {s.redis_url} is unreachable; start it or set REDIS_URL")
        redis_port = url.port or 6379
        console.print(f"[yellow]no Redis at {s.redis_url}: starting a private redis-server[/]")
    base = f"http://localhost:{s.api_port}"
    console.rule("[bold]inferq")
    console.print(
        f"API      {base}/v1   (health {base}/health, ready {base}/ready)\n"
        f"Flower   http://localhost:{s.flower_port}   (its /metrics too)\n"
        f"Metrics  {base}/metrics   worker :{s.worker_metrics_port}/metrics   "
        f"GPUs :{s.gpu_monitor_port}/metrics\n"
        f"API key  {key}\n\n"
        f"curl {base}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d '{{\"model\": \"{s.served_model_name}\", \"messages\": [{{\"role\": \"user\", "
        f"\"content\": \"What is the capital of France?\"}}]}}'\n\n"
        "The worker needs about a minute to start its engine; /ready turns 200 then. Ctrl-C stops all.",
        soft_wrap=True, highlight=False, markup=False)
    console.rule()
    # Procfile commands (inferq, python) must resolve to this environment.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = child_env(Path(".env"))
    kill_wait = s.api_graceful_timeout + STOP_MARGIN
    claim_pid_file()
    try:
        if redis_port is None:
            code = run_processes(procfile, PROCESSES, env, kill_wait)
        else:
            with private_redis(redis_port):
                code = run_processes(procfile, PROCESSES, env, kill_wait)
    finally:
        PID_FILE.unlink(missing_ok=True)
    sys.exit(code)


def running_stack() -> psutil.Process | None:
    """The ``inferq run`` whose pid :data:`PID_FILE` holds, if it still runs."""
    try:
        process = psutil.Process(int(PID_FILE.read_text(encoding="ascii").strip()))
        command = " ".join(process.cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    if not _running(process) or "inferq" not in command or " run" not in command:  # or a reused pid
        return None
    return process


def _running(process: psutil.Process) -> bool:
    """Still running: not gone, and not a zombie its parent has yet to wait for."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def claim_pid_file() -> None:
    """Record this run's pid for ``inferq stop``; refuse to start a second stack here."""
    other = running_stack()
    if other is not None and other.pid != os.getpid():
        raise click.ClickException(f"inferq run is already running here (pid {other.pid}); "
                                   "`inferq stop` stops it")
    PID_FILE.parent.mkdir(parents=True, exist_ok=True)
    PID_FILE.write_text(f"{os.getpid()}\n", encoding="ascii")


@click.command("stop")
@click.option("--timeout", type=float, default=None,
              help="Seconds to wait for it to exit (default API_GRACEFUL_TIMEOUT plus a margin).")
def stop(timeout: float | None) -> None:
    """Stop the stack that `inferq run` started from this directory, gracefully.

    It gets SIGTERM, as with Ctrl-C: open streams finish within API_GRACEFUL_TIMEOUT, then
    every process exits (SIGKILL only for one that will not).
    """
    process = running_stack()
    if process is None:
        console.print("nothing is running: no `inferq run` started from this directory")
        return
    wait = timeout if timeout is not None else get_settings().api_graceful_timeout + STOP_MARGIN + 5
    console.print(f"stopping inferq run (pid {process.pid}); open streams may take up to {wait:.0f} s")
    process.terminate()
    deadline = time.monotonic() + wait
    next_note = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not _running(process):
            console.print("stopped")
            return
        if time.monotonic() >= next_note:
            console.print(f"still stopping ({deadline - time.monotonic():.0f} s left)")
            next_note += 5
        time.sleep(0.2)
    raise click.ClickException(f"inferq run (pid {process.pid}) did not stop within {wait:.0f} s")
