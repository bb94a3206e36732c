"""``inferq``: run everything, or one part (api, worker, flower), and prepare models.

Subcommands are loaded lazily by name, so ``inferq worker`` never imports the
API and ``inferq api`` never imports vLLM.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from config import get_settings

LAZY_COMMANDS = {
    "api": "api.cli:api",
    "worker": "workers.cli:worker",
    "prepare-model": "workers.cli:prepare_model",
    "download-model": "workers.cli:download_model",
    "run": "inferq.stack:run",
    "stop": "inferq.stack:stop",
    "db": "api.keys_cli:db",
    "keys": "api.keys_cli:keys",
    "gpu-monitor": "gpu_monitor.cli:gpu_monitor",
    "loadtest": "loadtest.cli:loadtest",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[cmd_name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """inferq: a queue-based, OpenAI-compatible LLM inference service.

    Configuration comes from the environment and ./.env (see config/.env.example).
    """


@main.command("flower", context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, help="Port (default FLOWER_PORT, 5555).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int | None, flower_args: Any) -> None:
    """Run Flower, Celery's monitoring UI (with /metrics), on the queue."""
    s = get_settings()
    argv = [sys.executable, "-m", "celery", "-A", "queueing.celery_app:app", "flower",
            f"--port={port or s.flower_port}", *flower_args]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
