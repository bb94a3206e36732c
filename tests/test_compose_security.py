"""Security of the deployment in ``compose/`` (issue 15, C1 and M1).

The secrets have no defaults, ports are published on 127.0.0.1, Prometheus' lifecycle API is
off, Flower needs basic auth, Redis a password, Grafana no anonymous access, the images run as
a user that is not root, and the application's PostgreSQL role is no superuser (its init
script is run against the PostgreSQL server of the test machine). The compose helpers are
``tests/test_compose.py``'s.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from flower.command import apply_env_options
from flower.options import options as flower_options
from limits.storage import RedisStorage
from psycopg import sql

from api import migrate
from config import Settings
from inferq.cli import flower_command
from queueing.celery_app import make_celery
from queueing.connections import get_redis
from tests.compose_files import (
    COMPOSE,
    COMPOSE_FILE,
    DOCKERFILES,
    FAKE_SECRETS,
    SECRETS,
    VARIABLE,
    MissingVariables,
    compose,
    deployed,
    environment,
    load_yaml,
)
from tests.conftest import free_port, wait_for
from tests.sql_fixtures import POSTGRES_ADMIN, POSTGRES_HOST, POSTGRES_PORT, POSTGRES_UNREACHABLE

ENV_EXAMPLE = COMPOSE / ".env.example"
POSTGRES_INIT = COMPOSE / "postgres" / "initdb" / "10-inferq-app-role.sh"
APP_ROLE = "inferq_app"


def test_compose_refuses_to_start_without_its_secrets() -> None:
    """Each secret unset (or empty, as in .env.example) stops `docker compose up` with a clear message."""
    with pytest.raises(MissingVariables) as refused:
        deployed({})
    assert set(refused.value.missing) == SECRETS
    for name, message in refused.value.missing.items():
        assert name in message and "compose/.env.example" in message, message
    for name in SECRETS:
        with pytest.raises(MissingVariables) as refused:
            deployed({**FAKE_SECRETS, name: ""})
        assert set(refused.value.missing) == {name}
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    assert SECRETS <= example, f"not in compose/.env.example: {sorted(SECRETS - example)}"


def test_secrets_have_no_defaults() -> None:
    text = COMPOSE_FILE.read_text()
    for match in VARIABLE.finditer(text):
        if match.group("name") in SECRETS:
            assert match.group("op") == ":?", f"{match.group()} must be required (${{NAME:?message}})"
    for literal in ("admin/admin", ":inferq@", "PASSWORD: inferq", "PASSWORD: admin"):
        assert literal not in text
    services = deployed()["services"]
    assert environment(services["postgres"])["POSTGRES_PASSWORD"] == FAKE_SECRETS["POSTGRES_PASSWORD"]
    assert environment(services["postgres"])["INFERQ_DB_PASSWORD"] == FAKE_SECRETS["INFERQ_DB_PASSWORD"]
    grafana = environment(services["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == FAKE_SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert environment(services["flower"])["FLOWER_BASIC_AUTH"] == FAKE_SECRETS["FLOWER_BASIC_AUTH"]


def published_ports(services: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(service, host address or None, the port mapping) of every published port."""
    found: list[tuple[str, str | None, str]] = []
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                found.append((name, port.get("host_ip"), str(port)))
            else:
                parts = str(port).rsplit(":", 2)
                found.append((name, parts[0] if len(parts) == 3 else None, str(port)))
    return found


def test_published_ports_listen_on_loopback_by_default() -> None:
    ports = published_ports(deployed()["services"])
    assert {name for name, _, _ in ports} == {"api", "flower", "prometheus", "grafana", "loki", "jaeger"}
    wrong = [(name, mapping) for name, host, mapping in ports if host != "127.0.0.1"]
    assert not wrong, f"published beyond 127.0.0.1 by default: {wrong}"
    opened = published_ports(deployed({**FAKE_SECRETS, "BIND_ADDRESS": "0.0.0.0"})["services"])
    assert {name for name, host, _ in opened if host == "0.0.0.0"} == {
        "flower", "prometheus", "grafana", "loki", "jaeger"}
    opened = published_ports(deployed({**FAKE_SECRETS, "API_BIND_ADDRESS": "10.0.0.5"})["services"])
    assert {name for name, host, _ in opened if host == "10.0.0.5"} == {"api"}


def test_prometheus_lifecycle_and_admin_apis_are_off() -> None:
    command = " ".join(compose()["services"]["prometheus"]["command"])
    assert "--web.enable-lifecycle" not in command, "POST /-/quit would stop Prometheus"
    assert "--web.enable-admin-api" not in command


def test_flower_requires_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower in compose gets FLOWER_BASIC_AUTH, and Flower itself reads that variable as --basic-auth."""
    flower = deployed()["services"]["flower"]
    assert environment(flower)["FLOWER_BASIC_AUTH"] == FAKE_SECRETS["FLOWER_BASIC_AUTH"]
    env = environment(flower)
    assert env["FLOWER_ADDRESS"] == "0.0.0.0", "inside its container, reachable by Prometheus"
    # The command compose runs is accepted by `inferq flower` with compose's environment.
    assert flower["command"][:2] == ["inferq", "flower"]
    port = int(flower["command"][flower["command"].index("--port") + 1])
    rest = tuple(a for a in flower["command"][2:] if a not in ("--port", str(port)))
    argv, child_env = flower_command(Settings(_env_file=None, flower_address=env["FLOWER_ADDRESS"],
                                              flower_basic_auth=env["FLOWER_BASIC_AUTH"]), port, rest)
    assert "--address=0.0.0.0" in argv and child_env == {"FLOWER_BASIC_AUTH": env["FLOWER_BASIC_AUTH"]}
    before = flower_options.basic_auth
    for name in list(os.environ):
        if name.startswith("FLOWER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:one,admin:two")
    try:
        apply_env_options()
        assert flower_options.basic_auth == ["ops:one", "admin:two"]
    finally:
        flower_options.basic_auth = before


def test_redis_requires_a_password_and_every_client_has_it() -> None:
    services = deployed()["services"]
    password = FAKE_SECRETS["REDIS_PASSWORD"]
    redis_service = services["redis"]
    command = redis_service["command"]
    assert command[command.index("--requirepass") + 1] == password
    assert environment(redis_service)["REDISCLI_AUTH"] == password
    assert "PONG" in " ".join(redis_service["healthcheck"]["test"]), "redis-cli exits 0 on NOAUTH"
    assert environment(services["redis-exporter"])["REDIS_PASSWORD"] == password
    clients = {name for name, service in services.items() if "REDIS_URL" in environment(service)}
    assert {"api", "coordinator", "migrate", "worker", "worker-tp", "flower", "gpu-monitor"} <= clients
    for name in clients:
        url = urlsplit(environment(services[name])["REDIS_URL"])
        assert (url.hostname, url.password) == ("redis", password), name


def test_the_compose_redis_url_authenticates_every_client(redis_password_server: tuple[int, str]) -> None:
    """A REDIS_URL of compose's form reaches a requirepass server through redis-py, Celery and limits."""
    port, password = redis_password_server
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    assert get_redis(url).ping()
    celery = make_celery(Settings(_env_file=None, redis_url=url))
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
    assert RedisStorage(url).check()
    denied = f"redis://127.0.0.1:{port}/0"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(denied).ping()


@pytest.fixture
def redis_password_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make install` (it installs it)")
    port, password = free_port(), secrets.token_hex(16)
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis.Redis(port=port, password=password).ping(), 10, "redis-server", proc)
        yield port, password
    finally:
        proc.terminate()
        proc.wait(10)


def test_grafana_has_no_anonymous_access_and_read_only_datasources() -> None:
    grafana = environment(deployed()["services"]["grafana"])
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["GF_USERS_ALLOW_ORG_CREATE"] == "false"
    assert grafana["GF_USERS_DEFAULT_ROLE"] == "Viewer"
    for path in (COMPOSE / "grafana" / "provisioning" / "datasources").glob("*.y*ml"):
        for source in load_yaml(path)["datasources"]:
            assert source["editable"] is False, (path.name, source["name"])
            assert source["type"] in {"prometheus", "loki", "jaeger"}, "no SQL data source in Grafana"


def test_the_application_connects_as_a_role_that_is_not_the_superuser() -> None:
    services = deployed()["services"]
    postgres = environment(services["postgres"])
    assert postgres["INFERQ_DB_USER"] == APP_ROLE != postgres["POSTGRES_USER"]
    for name, service in services.items():
        url = environment(service).get("DATABASE_URL")
        if url is not None:
            parts = urlsplit(url)
            assert (parts.username, parts.password) == (APP_ROLE, FAKE_SECRETS["INFERQ_DB_PASSWORD"]), name
    mounts = dict(v.split(":")[:2] for v in services["postgres"]["volumes"] if v.startswith("./"))
    assert mounts == {"./postgres/initdb": "/docker-entrypoint-initdb.d"}
    check = " ".join(services["postgres"]["healthcheck"]["test"])
    assert "-h 127.0.0.1" in check, "over the socket, the server that runs the init scripts looks ready"
    assert sorted(p.name for p in (COMPOSE / "postgres" / "initdb").iterdir()) == [POSTGRES_INIT.name]
    assert os.access(POSTGRES_INIT, os.X_OK), "the image sources a script that is not executable"
    text = POSTGRES_INIT.read_text()
    assert "NOSUPERUSER" in text and "NOCREATEROLE" in text and "NOCREATEDB" in text


@pytest.fixture
def scratch_postgres() -> Iterator[tuple[str, str]]:
    """A database and a role name of this test's own on the machine's PostgreSQL; both dropped after."""
    if shutil.which("psql") is None:
        pytest.fail("psql is not installed (Debian package postgresql-client)")
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True)
    except psycopg.OperationalError:
        if os.environ.get("INFERQ_REQUIRE_POSTGRES") == "1":
            raise
        pytest.skip(POSTGRES_UNREACHABLE)
    name = f"inferq_c1_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name, f"{name}_app"
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(f"{name}_app")))


def run_init_script(database: str, role: str, pgdata: Path, password: str) -> None:
    env = {**os.environ, "PGHOST": POSTGRES_HOST, "PGPORT": str(POSTGRES_PORT), "PGDATA": str(pgdata),
           "POSTGRES_USER": "postgres", "POSTGRES_DB": database, "INFERQ_DB_USER": role,
           "INFERQ_DB_PASSWORD": password}
    result = subprocess.run(["sh", str(POSTGRES_INIT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert password not in result.stdout + result.stderr


@pytest.mark.parametrize("volume", ["new", "made-before-the-role"])
def test_postgres_init_script_makes_an_owner_role_that_is_no_superuser(
    scratch_postgres: tuple[str, str], tmp_path: Path, volume: str,
) -> None:
    """The script, run as the image runs it, against a real server: on a new database, and on one
    whose tables the superuser made (a volume from before the role; the script is run by hand)."""
    database, role = scratch_postgres
    superuser_url = f"postgresql+psycopg://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"
    app_url = f"postgresql+psycopg://{role}@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"
    if volume != "new":
        migrate.upgrade(superuser_url)
    (tmp_path / "pg_hba.conf").write_text("local all all trust\nhost all all all scram-sha-256\n")
    run_init_script(database, role, tmp_path, "it's \"quoted\"")
    run_init_script(database, role, tmp_path, "a second run changes the password only")

    admin = f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres dbname={database}"
    with psycopg.connect(admin) as connection:
        attributes = connection.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin,"
            " rolpassword LIKE 'SCRAM-SHA-256$%%' FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
        assert attributes == (False, False, False, False, False, True, True)
        owner = connection.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                                   (database,)).fetchone()
        assert owner == (role,)
    assert migrate.upgrade(app_url) == migrate.head()  # the role runs the app's migrations
    with psycopg.connect(admin) as connection:
        foreign = connection.execute(
            "SELECT relname, pg_get_userbyid(relowner) FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace AND pg_get_userbyid(relowner) <> %s",
            (role,)).fetchall()
        assert not foreign, f"not the role's, so its migrations cannot alter them: {foreign}"
        tables = connection.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert tables is not None and tables[0] >= 4
    with psycopg.connect(f"host={POSTGRES_HOST} port={POSTGRES_PORT} user={role} dbname={database}") as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("COPY (SELECT 1) TO PROGRAM 'true'")
    hba = [line for line in (tmp_path / "pg_hba.conf").read_text().splitlines() if not line.startswith("#")]
    assert hba[0] == "host all postgres all reject", "the superuser logs in over the socket only"
    assert hba.count(hba[0]) == 1


def test_images_run_as_a_user_that_is_not_root() -> None:
    homes = {}
    for path in DOCKERFILES:
        users = re.findall(r"^USER\s+(\S+)", path.read_text(), re.M)
        assert users, f"{path.name} runs as root"
        assert users[-1].split(":")[0] not in {"root", "0"}, path.name
        match = re.search(r"useradd[^\n]*?\s(\S+)\s*\\?$", path.read_text(), re.M)
        assert match and match.group(1) == users[-1], path.name
        homes[path.name] = f"/home/{users[-1]}"
    for name in ("worker", "worker-tp"):
        cache = [v for v in compose()["services"][name]["volumes"] if v.startswith("hf-cache:")]
        assert cache == [f"hf-cache:{homes['Dockerfile.worker']}/.cache/huggingface"], name
