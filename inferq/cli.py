"""``inferq``: run everything, or one part (api, coordinator, worker, flower), and prepare models.

Subcommands are loaded lazily by name, so ``inferq worker`` never imports the
API and ``inferq api`` never imports vLLM.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import sys
from typing import Any

import click

from config import Settings, get_settings

LAZY_COMMANDS = {
    "api": "api.cli:api",
    "coordinator": "api.cli:coordinator",
    "worker": "workers.cli:worker",
    "prepare-model": "workers.cli:prepare_model",
    "download-model": "workers.cli:download_model",
    "run": "inferq.stack:run",
    "stop": "inferq.stack:stop",
    "status": "inferq.status:status",
    "db": "api.accounts.keys_cli:db",
    "keys": "api.accounts.keys_cli:keys",
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


def is_loopback(address: str) -> bool:
    """Whether ``address`` (a host name or IP; empty: every interface) is reachable from this host only."""
    if address.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def flower_command(settings: Settings, port: int | None = None,
                   flower_args: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """Flower's command line and the environment it adds: bound to ``FLOWER_ADDRESS``.

    Flower shows task arguments (prompts included). On an address other than loopback it
    must ask for credentials, so without ``FLOWER_BASIC_AUTH`` (or ``--basic-auth``) this
    raises a :class:`click.ClickException`. The credentials go to Flower in its environment
    (``FLOWER_BASIC_AUTH``, which Flower reads itself), not on its command line, where any
    local user could read them.
    """
    if any(arg.split("=", 1)[0] == "--address" for arg in flower_args):
        raise click.ClickException("Set Flower's address with FLOWER_ADDRESS, not --address.")
    has_auth = bool(settings.flower_basic_auth) or any(arg.startswith("--basic-auth") for arg in flower_args)
    if not is_loopback(settings.flower_address) and not has_auth:
        raise click.ClickException(
            f"Flower would listen on {settings.flower_address or 'every interface'} without credentials, "
            "and it shows task arguments (prompts): set FLOWER_BASIC_AUTH=user:password, or "
            "FLOWER_ADDRESS=127.0.0.1 and reach it through an SSH tunnel or a TLS reverse proxy.")
    argv = [sys.executable, "-m", "celery", "-A", "queueing.flower_app:app", "flower",
            f"--address={settings.flower_address}", f"--port={port or settings.flower_port}", *flower_args]
    env = {"FLOWER_BASIC_AUTH": settings.flower_basic_auth} if settings.flower_basic_auth else {}
    return argv, env


@main.command("flower", context_settings={"ignore_unknown_options": True})
@click.option("--port", type=int, help="Port (default FLOWER_PORT, 5555).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int | None, flower_args: Any) -> None:
    """Run Flower, Celery's monitoring UI (with /metrics), on the queue.

    It listens on FLOWER_ADDRESS (127.0.0.1); on any other address it requires
    FLOWER_BASIC_AUTH (user:password) and refuses to start without it.
    """
    argv, env = flower_command(get_settings(), port, tuple(flower_args))
    os.environ.update(env)
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
