"""``inferq api``: the API under gunicorn with gevent workers."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from api.accounts.keys import PlaceholderKeys, check_bootstrap_keys
from api.http.gunicorn_conf import OWNED_METRICS_DIR
from config import Settings, get_settings


def metrics_dir(settings: Settings) -> str:
    """An empty directory for this run's multiprocess metrics (PROMETHEUS_MULTIPROC_DIR)."""
    if not settings.prometheus_multiproc_dir:
        path = tempfile.mkdtemp(prefix="inferq-metrics-")
        os.environ[OWNED_METRICS_DIR] = path
        return path
    path = settings.prometheus_multiproc_dir
    Path(path).mkdir(parents=True, exist_ok=True)
    for stale in Path(path).glob("*.db"):  # samples of an earlier run would be summed in
        stale.unlink()
    return path


@click.command("api")
@click.option("--host", help="Bind address (default API_HOST).")
@click.option("--port", type=int, help="Port (default API_PORT, 8020).")
@click.option("--workers", type=int, help="gunicorn worker processes (default API_WORKERS).")
@click.option("--connections", type=int, default=1000, show_default=True,
              help="Concurrent connections per gevent worker (each stream holds one).")
def api(host: str | None, port: int | None, workers: int | None, connections: int) -> None:
    """Serve the OpenAI-compatible API (gunicorn + gevent)."""
    s = get_settings()
    try:
        check_bootstrap_keys(s)  # ENV=production: refuse placeholder keys before gunicorn starts
    except PlaceholderKeys as exc:
        raise click.ClickException(str(exc)) from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir(s)
    argv = [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gevent",
        "--workers", str(workers or s.api_workers),
        "--worker-connections", str(connections),
        "--bind", f"{host or s.api_host}:{port or s.api_port}",
        "--graceful-timeout", str(s.api_graceful_timeout),
        "--keep-alive", str(s.api_keepalive),
        "--config", str(Path(__file__).parent / "http" / "gunicorn_conf.py"),
        "--access-logfile", "-",
        "--no-control-socket",  # several API servers may share a host
        "api:create_app()",
    ]
    os.execv(sys.executable, argv)
