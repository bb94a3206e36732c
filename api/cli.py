"""``inferq api``: the API under gunicorn with gevent workers."""

from __future__ import annotations

import os
import sys

import click

from config import get_settings


@click.command("api")
@click.option("--host", help="Bind address (default API_HOST).")
@click.option("--port", type=int, help="Port (default API_PORT, 8020).")
@click.option("--workers", type=int, help="gunicorn worker processes (default API_WORKERS).")
@click.option("--connections", type=int, default=1000, show_default=True,
              help="Concurrent connections per gevent worker (each stream holds one).")
def api(host: str | None, port: int | None, workers: int | None, connections: int) -> None:
    """Serve the OpenAI-compatible API (gunicorn + gevent)."""
    s = get_settings()
    argv = [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gevent",
        "--workers", str(workers or s.api_workers),
        "--worker-connections", str(connections),
        "--bind", f"{host or s.api_host}:{port or s.api_port}",
        "--graceful-timeout", "30",
        "--access-logfile", "-",
        "--no-control-socket",  # several API servers may share a host
        "api:create_app()",
    ]
    os.execv(sys.executable, argv)
