"""``inferq run``: the whole stack on one machine, in the foreground.

Ensures a development key, the default model and a reachable Redis (starting a
private one when none answers), prints the URLs, then runs the Procfile's
processes (worker, API, coordinator, Flower, GPU exporter) under :mod:`inferq.supervisor`
with prefixed logs: one that dies is restarted, with backoff, up to RESTART_LIMIT.
Ctrl-C stops them gracefully; a Redis started here is stopped only after they
have all exited, so their last Redis calls succeed.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import click
import psutil
import redis
from honcho import environ
from rich.console import Console

from config import get_settings, logs
from inferq.cli import flower_command, is_loopback
from inferq.launcher import redis_answers, redis_server_argv
from inferq.status import redacted
from inferq.supervisor import Program, RestartPolicy, Supervisor
from queueing.connections import redis_client
from workers.model_prep import (
    ModelPrepError,
    find_packaged_gguf,
    is_default_model,
    needs_default_model,
    prepare_from_gguf,
)

console = Console(stderr=True)

PROCESSES = ("worker", "api", "coordinator", "flower", "gpu-monitor")
# Seconds beyond API_GRACEFUL_TIMEOUT that processes get to stop before SIGKILL
# (Celery's warm shutdown, the worker's engine shutdown).
STOP_MARGIN = 15
#: Where a running ``inferq run`` keeps its pid, for ``inferq stop`` (relative to where it runs).
PID_FILE = Path("data/inferq-run.pid")
#: The data directory (append-only file) of the private Redis ``inferq run`` starts.
REDIS_DIR = Path("data/redis")


def ensure_dev_key(env_file: Path) -> str:
    """The first bootstrap key; creates a random one in ``.env`` when none is set."""
    keys = get_settings().bootstrap_keys
    if keys:
        return keys[0]
    key = f"iq-dev-{secrets.token_urlsafe(24)}"
    append_secret(env_file, f"\n# development key created by `inferq run`\nAPI_KEYS={key}\n")
    os.environ["API_KEYS"] = key
    get_settings.cache_clear()
    console.print(f"[green]created a development API key in {env_file}[/]")
    return key


def append_secret(env_file: Path, text: str) -> None:
    """Append ``text`` to ``env_file``, which holds secrets: readable by its owner only (0600),
    created so, and narrowed to that if it was open to others."""
    fd = os.open(env_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
            console.print(f"{env_file} was readable by other users: it holds secrets, now 0600", markup=False)
        f.write(text)


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


def child_env(env_file: Path) -> dict[str, str]:
    """The processes' environment: ours, plus ``env_file`` entries we do not set ourselves
    (the same precedence as the settings: the environment wins over ``.env``)."""
    env = dict(os.environ)
    if env_file.exists():
        for name, value in environ.parse(env_file.read_text(encoding="utf-8")).items():
            env.setdefault(name, value)
    return env


def redis_program(port: int, env: dict[str, str], data_dir: Path = REDIS_DIR) -> Program:
    """A private redis-server for this run: started first (ready when it answers PING), stopped
    last, so the other processes' last Redis calls succeed.

    It keeps an append-only file in ``data_dir`` (fsync once a second), so queued jobs, job
    records and usage not yet in SQL survive a restart of the run or of the machine.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [*redis_server_argv(port, data_dir.resolve(), append_only=True), "--loglevel", "warning"]
    url = f"redis://127.0.0.1:{port}/0"
    return Program("redis-server", f"exec {shlex.join(argv)}", env, first=True,
                   ready=lambda: redis_answers(url))


def restart_policy() -> RestartPolicy:
    """RESTART_LIMIT restarts within RESTART_WINDOW seconds, the delay doubling from RESTART_BACKOFF."""
    s = get_settings()
    return RestartPolicy(limit=s.restart_limit, window=s.restart_window, backoff=s.restart_backoff)


def run_processes(procfile: Path, names: tuple[str, ...], env: dict[str, str], kill_wait: float,
                  policy: RestartPolicy | None = None, first: tuple[Program, ...] = ()) -> int:
    """Supervise ``names`` from ``procfile`` (after ``first``) until they stop; the exit code.

    It is non-zero when a process kept dying (after the message saying which).
    """
    commands = environ.parse_procfile(procfile.read_text(encoding="utf-8")).processes
    missing = [n for n in names if n not in commands]
    if missing:
        raise click.ClickException(f"{procfile} has no {', '.join(missing)} process")
    programs = [*first, *(Program(name, commands[name], env) for name in names)]
    supervisor = Supervisor(programs, kill_wait, policy or RestartPolicy())
    code = supervisor.run()
    if supervisor.gave_up:
        console.print(f"[red]inferq run gave up: {supervisor.gave_up}[/]", highlight=False, soft_wrap=True)
    return code


@click.command("run")
@click.option("--procfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("Procfile"), show_default=True)
def run(procfile: Path) -> None:
    """Run worker, API, coordinator, Flower and the GPU exporter together (and Redis if none is reachable).

    Logs are plain text here unless LOG_FORMAT says otherwise (deployments log JSON).
    A process that dies is restarted (RESTART_LIMIT times within RESTART_WINDOW seconds,
    then everything stops with a non-zero status). Ctrl-C stops everything gracefully
    (API_GRACEFUL_TIMEOUT plus a margin, then SIGKILL).
    """
    key = ensure_dev_key(Path(".env"))
    s = get_settings()
    ensure_model()
    if "log_format" not in s.model_fields_set:
        os.environ["LOG_FORMAT"] = "text"  # each line is prefixed with its process: keep it readable
    if "worker_task_events" not in s.model_fields_set:
        os.environ["WORKER_TASK_EVENTS"] = "true"  # Flower's task views, here where Flower runs
    flower_command(s)  # refuses a public Flower without credentials before anything starts
    redis_port = None
    if s.redis_sentinels:  # a Sentinel group: its primary, never a private redis-server
        try:
            redis_client(s).ping()
        except redis.RedisError as exc:
            raise click.ClickException(
                f"no Redis primary '{s.redis_sentinel_master}' through the sentinels {s.redis_sentinels}: "
                f"{exc}") from exc
    elif not redis_answers(s.redis_url, s.redis_ca_file):
        url = urlparse(s.redis_url)
        shown = redacted(s.redis_url)
        if url.hostname not in ("127.0.0.1", "localhost") or url.scheme != "redis" \
                or not shutil.which("redis-server"):
            raise click.ClickException(f"Redis at {shown} is unreachable; start it or set REDIS_URL")
        redis_port = url.port or 6379
        console.print(f"no Redis at {shown}: starting a private redis-server (data in {REDIS_DIR})",
                      style="yellow", markup=False, highlight=False)
    base = f"http://localhost:{s.api_port}"
    flower_host = "localhost" if is_loopback(s.flower_address) else (s.flower_address or "0.0.0.0")
    console.rule("[bold]inferq")
    console.print(
        f"API      {base}/v1   (health {base}/health, ready {base}/ready)\n"
        f"Flower   http://{flower_host}:{s.flower_port}   (its /metrics too"
        f"{'; basic auth' if s.flower_basic_auth else ''})\n"
        f"Metrics  {base}/metrics   worker :{s.worker_metrics_port}/metrics   "
        f"coordinator :{s.coordinator_metrics_port}/metrics   GPUs :{s.gpu_monitor_port}/metrics\n"
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
    first = () if redis_port is None else (redis_program(redis_port, env),)
    claim_pid_file()
    try:
        code = run_processes(procfile, PROCESSES, env, kill_wait, restart_policy(), first)
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
