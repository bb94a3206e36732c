"""The files of ``compose/`` as the compose tests read them: their paths, ``load_yaml()``,
``compose()`` (compose.yaml as written), ``deployed()`` (as ``docker compose config`` would see
it, interpolated with ``FAKE_SECRETS``) and ``environment()`` of a service."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "compose.yaml"
PROMETHEUS_YML = COMPOSE / "prometheus" / "prometheus.yml"
ALERTS_YML = COMPOSE / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = COMPOSE / "prometheus" / "alerts_test.yml"
DATASOURCE_YML = COMPOSE / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER_YML = COMPOSE / "grafana" / "provisioning" / "dashboards" / "inferq.yml"
DASHBOARD_JSON = COMPOSE / "grafana" / "dashboards" / "inferq.json"
DOCKERFILES = (COMPOSE / "Dockerfile.api", COMPOSE / "Dockerfile.worker")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


# --- compose.yaml as deployed: interpolated with the secrets it requires --------------

# Every secret compose needs; none may have a default.
SECRETS = frozenset({"POSTGRES_PASSWORD", "INFERQ_DB_PASSWORD", "REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
                     "FLOWER_BASIC_AUTH"})
FAKE_SECRETS = {name: f"{name.lower().replace('_', '-')}-{secrets.token_hex(4)}" for name in SECRETS}
FAKE_SECRETS["FLOWER_BASIC_AUTH"] = f"ops:{secrets.token_hex(8)}"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariables(Exception):
    """Compose would refuse the file: ``${NAME:?error}`` with NAME unset or empty."""

    def __init__(self, missing: dict[str, str]):
        super().__init__(", ".join(f"{name}: {error}" for name, error in sorted(missing.items())))
        self.missing = missing


def compose_interpolate(value: Any, env: Mapping[str, str], missing: dict[str, str]) -> Any:
    """Compose's interpolation of every string in ``value``; refusals are collected in ``missing``."""
    if isinstance(value, dict):
        return {key: compose_interpolate(item, env, missing) for key, item in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(item, env, missing) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op") or "", match.group("arg") or ""
        current = env.get(name)
        absent = not current if op.startswith(":") else current is None
        if op.endswith("?") and absent:
            missing[name] = arg
        if op.endswith("-") and absent:
            return arg
        return current or ""

    return VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def deployed(env: Mapping[str, str] = FAKE_SECRETS) -> dict[str, Any]:
    """compose.yaml as ``docker compose config`` would see it with ``env``, or MissingVariables."""
    missing: dict[str, str] = {}
    result: dict[str, Any] = compose_interpolate(compose(), env, missing)
    if missing:
        raise MissingVariables(missing)
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else dict(env)
