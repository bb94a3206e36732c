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


@click.command("coordinator")
@click.option("--once", is_flag=True,
              help="Do one round (drain usage and finished batch lines, one pass over the batches) and exit.")
def coordinator(once: bool) -> None:
    """Run the background work the API hands off: the usage ledger's drain into SQL, batch
    collection, and batch dispatch, resumption, cancelling, expiry and finalization.

    Run one or more per deployment (two are safe: they share the work). SIGTERM or Ctrl-C
    stops it; a batch it was dispatching is resumed by another coordinator, or by this one
    when it starts again.
    """
    import signal
    import threading

    from api.coordinator import Coordinator
    from api.http.metrics import serve_coordinator_metrics
    from api.services import build_services
    from config import logs, tracing

    s = get_settings()
    logs.configure(s.log_level, s.log_format)
    tracing.init_tracing("inferq-coordinator")
    worker = Coordinator(build_services(s))
    if once:
        worker.run_once()
        return
    if s.coordinator_metrics_port:
        try:
            serve_coordinator_metrics(s.coordinator_metrics_port)
        except OSError as exc:
            click.echo(f"coordinator: metrics port {s.coordinator_metrics_port} unavailable: {exc}", err=True)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    worker.start()
    while not stopped.wait(1.0):
        pass
    worker.stop()
