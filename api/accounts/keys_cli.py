"""``inferq db`` and ``inferq keys``: schema migrations and API-key management.

This module only reads options and prints; :mod:`api.accounts.keys` and
:mod:`api.migrate` do the work.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis
from alembic.util import CommandError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from api import migrate
from api.accounts import keys as keystore
from api.accounts.keys import KeyChanges, KeyInfo
from api.accounts.revocation import stop_work_of
from api.db import Database
from config import get_settings
from queueing.connections import redis_client

KEY_REF_HELP = ("KEY_ID is a key's id (key_...) or its prefix (iq-AbC...), as `inferq keys list` shows, "
                "or the key itself.")
DURATION_HELP = "a date (2027-01-31, 00:00 UTC), an ISO time, or a duration from now (90m, 12h, 30d, 2w)"


# --- option types ----------------------------------------------------------------


class Parsed(click.ParamType):
    """An option value read by a parser of :mod:`api.accounts.keys`; the ``clear`` words stand
    for ``None``."""

    def __init__(self, metavar: str, parse: Callable[[str], object], clear: tuple[str, ...] = ()):
        self.name = metavar + (f"|{clear[0]}" if clear else "")
        self.parse = parse
        self.clear = clear

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # already converted
            return value
        if value.strip().lower() in self.clear:
            return None
        try:
            return self.parse(value)
        except keystore.KeyAdminError as exc:
            self.fail(str(exc), param, ctx)


LIMIT = Parsed("N", keystore.parse_limit)
LIMIT_OR_NONE = Parsed("N", keystore.parse_limit, ("none", "unlimited"))
EXPIRY = Parsed("WHEN", keystore.parse_expiry)
EXPIRY_OR_NEVER = Parsed("WHEN", keystore.parse_expiry, ("never",))
MODELS = Parsed("M1,M2", keystore.parse_models)
MODELS_OR_ALL = Parsed("M1,M2", keystore.parse_models, ("all",))


@contextmanager
def _operator_errors(url: str) -> Iterator[None]:
    """Errors an operator can act on become click errors: a message, no traceback."""
    try:
        yield
    except (keystore.KeyAdminError, migrate.MigrationError, CommandError) as exc:
        raise click.ClickException(str(exc)) from None
    except ArgumentError as exc:
        raise click.ClickException(f"DATABASE_URL is not a database URL: {exc}") from None
    except OperationalError as exc:
        raise click.ClickException(f"Cannot use the database {_shown_url(url)}: {exc.orig or exc}") from None


@contextmanager
def _database() -> Iterator[Database]:
    """The database of DATABASE_URL, migrated, and disposed of afterwards."""
    settings = get_settings()
    with _operator_errors(settings.database_url):
        database = Database(settings)
        try:
            database.create_schema()
            yield database
        finally:
            database.engine.dispose()


# --- inferq db -----------------------------------------------------------------------


@click.group("db")
def db() -> None:
    """The SQL database (DATABASE_URL): schema migrations.

    The API migrates to the newest revision itself when it starts; run
    `inferq db upgrade` to do it beforehand (e.g. in a deploy step).
    """


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to migrate to.")
def db_upgrade(revision: str) -> None:
    """Migrate the database to the newest (or the given) revision and print it."""
    url = get_settings().database_url
    with _operator_errors(url):
        now = migrate.upgrade(url, revision)
    click.echo(f"{_shown_url(url)} is at revision {now}{' (head)' if now == migrate.head() else ''}.")


@db.command("current")
def db_current() -> None:
    """Print the revision the database is at, and the newest one."""
    url = get_settings().database_url
    with _operator_errors(url):
        now = migrate.current(url)
    click.echo(f"{_shown_url(url)} is at revision {now or 'none (never migrated)'}; "
               f"head is {migrate.head()}.")


# --- inferq keys ---------------------------------------------------------------------


@click.group("keys")
def keys() -> None:
    """API keys kept in DATABASE_URL: create, list, revoke, update.

    Only a key's hash is stored: the key is shown once, when it is created.
    Changes apply at once on every API host. Keys given in API_KEYS
    (bootstrap keys) are not stored and not listed here, unless revoked.
    """


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for (shown in lists and logs).")
@click.option("--rpm", type=LIMIT, help="Requests per minute (default: unlimited).")
@click.option("--tpm", type=LIMIT, help="Tokens per minute, prompt + completion (default: unlimited).")
@click.option("--daily-tokens", type=LIMIT, help="Tokens per UTC day (default: unlimited).")
@click.option("--models", type=MODELS, help="Comma-separated models the key may use (default: all).")
@click.option("--expires", type=EXPIRY, help=f"When the key stops working: {DURATION_HELP} "
              "(default: never).")
@click.option("--json", "as_json", is_flag=True, help="Print the key and its record as JSON.")
def create(name: str, rpm: int | None, tpm: int | None, daily_tokens: int | None,
           models: tuple[str, ...] | None, expires: dt.datetime | None, as_json: bool) -> None:
    """Create a key and print it, once: it cannot be shown again."""
    with _database() as database:
        created = keystore.create_key(database, name, rpm=rpm, tpm=tpm, daily_tokens=daily_tokens,
                                      models=models, expires_at=expires)
    if as_json:
        click.echo(json.dumps({"key": created.key, **created.info.to_json()}, indent=2))
        return
    click.echo(f"Created key {created.info.public_id} ({_summary(created.info)}).\n")
    click.echo(f"    {created.key}\n")
    click.echo("Copy it now: it cannot be shown again (only its hash is stored).")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_(as_json: bool) -> None:
    """List every stored key, revoked and expired ones included (times in UTC)."""
    with _database() as database:
        infos = keystore.list_keys(database)
    if as_json:
        click.echo(json.dumps([info.to_json() for info in infos], indent=2))
    elif not infos:
        click.echo("No keys yet: create one with `inferq keys create --name NAME`.")
    else:
        _print_keys(infos)


@keys.command("revoke", epilog=KEY_REF_HELP + " A key of API_KEYS (bootstrap key) is named by the key "
              "itself or its id (bootstrap-...).")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke a key and stop its work.

    Every API host refuses the key from its next request on (a bootstrap key within a
    second). Its open batches are cancelled, and its queued and running jobs too: open
    streams end with their cancelled event. Run it again if that step failed.
    """
    settings = get_settings()
    with _database() as database:
        info, now = keystore.revoke_key(database, key_id, settings.bootstrap_keys)
        if now:
            click.echo(f"Revoked {info.public_id} ({_summary(info)}).")
        else:
            click.echo(f"{info.public_id} was already revoked on {_when(info.revoked_at)}.")
        try:
            stopped = stop_work_of(settings, database, redis_client(settings), info.public_id)
        except redis.RedisError as exc:
            raise click.ClickException(
                f"The key is revoked, but its queued work could not be cancelled (Redis: {exc}); "
                "run this command again once Redis answers.") from None
    click.echo(f"Cancelled {stopped.batches} open batch(es) and {stopped.jobs} queued or running job(s).")


@keys.command("update", epilog=KEY_REF_HELP)
@click.argument("key_id")
@click.option("--name", help="A new name.")
@click.option("--rpm", type=LIMIT_OR_NONE, help="Requests per minute, or none (unlimited).")
@click.option("--tpm", type=LIMIT_OR_NONE, help="Tokens per minute, or none (unlimited).")
@click.option("--daily-tokens", type=LIMIT_OR_NONE, help="Tokens per UTC day, or none (unlimited).")
@click.option("--models", type=MODELS_OR_ALL, help="Comma-separated models the key may use, or all.")
@click.option("--expires", type=EXPIRY_OR_NEVER,
              help=f"When the key stops working: {DURATION_HELP}, or never.")
@click.pass_context
def update(ctx: click.Context, key_id: str, **options: Any) -> None:
    """Change a key's name, limits, models or expiry; options not given are kept."""
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) is not click.ParameterSource.DEFAULT}
    if "expires" in given:
        given["expires_at"] = given.pop("expires")
    changes = KeyChanges(**given)
    if changes.is_empty():
        raise click.UsageError("Nothing to change: give at least one of --name, --rpm, --tpm, "
                               "--daily-tokens, --models, --expires.")
    with _database() as database:
        info = keystore.update_key(database, key_id, changes)
    click.echo(f"Updated {info.public_id} ({_summary(info)}).")
    if info.status() != "active":
        click.echo(f"Note: this key is {info.status()}.")


# --- printing ------------------------------------------------------------------------


def _print_keys(infos: list[KeyInfo]) -> None:
    """A table if the terminal is wide enough for it unwrapped, else a few lines per key."""
    console = Console()
    table = _table(infos)
    if console.measure(table, options=console.options.update_width(10_000)).maximum <= console.width:
        console.print(table)
        return
    for info in infos:
        console.print(f"[bold]{info.public_id}[/bold]  {escape(info.name)}  ({info.status()})",
                      highlight=False)
        console.print(f"  prefix {info.prefix}  rpm {_limit(info.rpm)}  tpm {_limit(info.tpm)}  "
                      f"tokens/day {_limit(info.daily_tokens)}  models {_models(info)}", highlight=False)
        console.print(f"  created {_when(info.created_at)}  last used {_when(info.last_used_at)}  "
                      f"expires {_when(info.expires_at)}  revoked {_when(info.revoked_at)}", highlight=False)
    console.print("Times in UTC; -: unlimited, never.")


def _table(infos: list[KeyInfo]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, caption="Times in UTC; -: unlimited, never.",
                  caption_justify="left")
    for header in ("ID", "Name", "Prefix", "RPM", "TPM", "Tokens/day", "Models", "Created", "Last used",
                   "Expires", "Revoked"):
        table.add_column(header, justify="right" if header in ("RPM", "TPM", "Tokens/day") else "left")
    for info in infos:
        status = info.status()
        table.add_row(info.public_id, escape(info.name), info.prefix, _limit(info.rpm), _limit(info.tpm),
                      _limit(info.daily_tokens), escape(_models(info)),
                      _when(info.created_at), _when(info.last_used_at),
                      _when(info.expires_at) + (" (expired)" if status == "expired" else ""),
                      _when(info.revoked_at), style="dim" if status != "active" else None)
    return table


def _models(info: KeyInfo) -> str:
    return ",".join(info.models) if info.models else "all"


def _summary(info: KeyInfo) -> str:
    return (f"name {info.name!r}, prefix {info.prefix}, rpm {_limit(info.rpm)}, tpm {_limit(info.tpm)}, "
            f"daily tokens {_limit(info.daily_tokens)}, models {_models(info)}, "
            f"expires {_when(info.expires_at, 'never')}")


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _when(value: dt.datetime | None, none: str = "-") -> str:
    return none if value is None else value.strftime("%Y-%m-%d %H:%M")


def _shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
