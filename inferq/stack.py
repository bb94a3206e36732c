"""``inferq run``: the whole stack on one machine, in the foreground.

Ensures a development key, the default model and a reachable Redis (starting
one under honcho when none answers), prints the URLs, then hands over to
honcho, which runs worker, API and Flower with prefixed logs; Ctrl-C stops all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import click
import redis
from rich.console import Console

from config import get_settings

console = Console(stderr=True)


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
    """Prepare the default model when MODEL_NAME points at a missing local directory."""
    from workers.model_prep import is_prepared

    s = get_settings()
    path = Path(s.model_name)
    if s.engine == "vllm" and s.model_name.startswith(("models/", "./", "/")) and not is_prepared(path):

        from workers.cli import prepare_model

        prepare_model.main(args=["--target", str(path)], standalone_mode=False)


@click.command("run")
@click.option("--procfile", type=click.Path(exists=True, path_type=Path), default=Path("Procfile"),
              show_default=True)
def run(procfile: Path) -> None:
    """Run worker, API, Flower and the GPU exporter together (and Redis if none is reachable).

    Logs are plain text here unless LOG_FORMAT says otherwise (deployments log JSON).
    """
    key = ensure_dev_key(Path(".env"))
    s = get_settings()
    ensure_model()
    processes = ["worker", "api", "flower", "gpu-monitor"]
    if "log_format" not in s.model_fields_set:
        os.environ["LOG_FORMAT"] = "text"  # honcho prefixes each line with its process: keep it readable
    if "worker_task_events" not in s.model_fields_set:
        os.environ["WORKER_TASK_EVENTS"] = "true"  # Flower's task views, here where Flower runs
    if not redis_reachable(s.redis_url):
        url = urlparse(s.redis_url)
        if url.hostname not in ("127.0.0.1", "localhost") or not shutil.which("redis-server"):
            raise click.ClickException(f"Redis at {s.redis_url} is unreachable; start it or set REDIS_URL")
        os.environ["INFERQ_REDIS_PORT"] = str(url.port or 6379)
        processes.insert(0, "redis")
        console.print(f"[yellow]no Redis at {s.redis_url}: starting redis-server under honcho[/]")
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
    honcho = [sys.executable, "-m", "honcho", "-f", str(procfile), "start", *processes]
    os.execv(sys.executable, honcho)
