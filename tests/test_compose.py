"""The deployment in ``compose/``: Compose file, images, Prometheus, alerts, Grafana.

No Docker engine runs here, so the Compose file is checked against the Compose
Specification's JSON schema (``tests/data/compose-spec.json``, the schema of
github.com/compose-spec/compose-spec as shipped in the npm package ``dclint`` 3.1.0,
``schemas/compose.schema.json``). Prometheus files are checked by ``promtool``
(Debian ``prometheus`` package, installed by ``make install``). Every metric name
the dashboard and the alerts use must be one the services export (``CONTRACT``).

The helpers the compose tests share live in ``tests/compose_files.py``: ``compose()``,
``deployed()`` (the file as ``docker compose config`` would see it, with ``FAKE_SECRETS``),
``environment()``, ``load_yaml()`` and the paths of ``compose/``. The security of the deployment is tested in
``tests/test_compose_security.py``, logs and traces in ``tests/test_compose_logs.py``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import yaml

from inferq.cli import main as inferq_main
from tests.compose_files import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    COMPOSE,
    COMPOSE_FILE,
    DASHBOARD_JSON,
    DASHBOARD_PROVIDER_YML,
    DATASOURCE_YML,
    DOCKERFILES,
    FAKE_SECRETS,
    PROMETHEUS_YML,
    ROOT,
    compose,
    compose_interpolate,
    deployed,
    load_yaml,
)

SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

# Histograms by base name: PromQL uses <name>_bucket, _count and _sum.
HISTOGRAMS = frozenset({
    "flask_http_request_duration_seconds",
    "inferq_request_duration_seconds", "inferq_ttft_seconds", "inferq_queue_wait_seconds",
    "inferq_worker_publish_seconds",
    "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "flower_task_runtime_seconds",
})
# Every other series name the services export (and Prometheus' own `up`).
CONTRACT = frozenset({
    # API (/metrics on :8020)
    "flask_http_request_total",
    "inferq_tokens_total", "inferq_auth_failures_total", "inferq_rejections_total",
    "inferq_ledger_dead_letters_total",
    "inferq_queue_depth", "inferq_live_workers",
    # worker (:9200): vLLM's and inferq's
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "inferq_worker_active_jobs", "inferq_worker_slots", "inferq_worker_batch_slots",
    "inferq_worker_jobs_total",
    # gpu-monitor (:9101)
    "inferq_gpu_up", "inferq_gpu_count", "inferq_gpu_utilization_percent", "inferq_gpu_memory_used_bytes",
    "inferq_gpu_memory_free_bytes", "inferq_gpu_memory_total_bytes", "inferq_gpu_power_watts",
    "inferq_gpu_temperature_celsius", "inferq_gpu_sm_clock_hertz", "inferq_gpu_ecc_uncorrected_errors",
    "inferq_gpu_poll_errors_total",
    # Flower (:5555), as flower/events.py names them
    "flower_events_total", "flower_worker_online", "flower_task_prefetch_time_seconds",
    "flower_worker_prefetched_tasks", "flower_worker_number_of_currently_executing_tasks",
    # redis_exporter (:9121)
    "redis_up", "redis_connected_clients", "redis_memory_used_bytes",
    # Prometheus itself
    "up",
})
# What the dashboard and alerts together must show: every inferq and vLLM contract metric.
MUST_BE_USED = frozenset(
    name for name in CONTRACT | HISTOGRAMS
    if name.startswith(("inferq_", "vllm:")) or name in {"flask_http_request_total", "redis_up"}
)

ALERTS = frozenset({
    "KVCacheHigh", "KVCacheCritical", "QueueDepthHigh", "NoLiveWorker", "P99LatencyHigh", "P99TTFTHigh",
    "ErrorRatioHigh", "GPUMemoryLow", "GPUTemperatureHigh", "GPUECCErrors", "WorkerDown", "TargetDown",
    "LedgerDeadLetters",
})
SERVICES = frozenset({"redis", "postgres", "api", "coordinator", "worker", "flower", "gpu-monitor",
                      "redis-exporter", "prometheus", "grafana", "loki", "alloy", "jaeger"})
# Grafana's variables, replaced by a value Prometheus accepts when an expression is evaluated.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

PROMQL_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
})


# --- helpers shared with tests/test_prometheus_live.py -----------------------------------

def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every dashboard target."""
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml."""
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def substitute_grafana_variables(expr: str, values: dict[str, str] | None = None) -> str:
    for name, value in (values or GRAFANA_VARIABLES).items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (a lexical scan, enough for our rules)."""
    text = substitute_grafana_variables(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word, rest = match.group(), text[match.end():]
        if rest.lstrip().startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if re.match(r"\d", text[match.start() - 1:match.start()] or " "):
            continue  # the exponent of a number such as 1e9
        names.add(word)
    return names


def is_contract_name(name: str) -> bool:
    if name in CONTRACT or name in HISTOGRAMS:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in {"bucket", "count", "sum"} and base in HISTOGRAMS


def histogram_base(name: str) -> str:
    base, _, suffix = name.rpartition("_")
    return base if suffix in {"bucket", "count", "sum"} and base in HISTOGRAMS else name


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run `make install` (Debian package prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with every variable unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# --- promtool ---------------------------------------------------------------------------

def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_YML.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS_YML.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST_YML.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses each dashboard query (as a recording rule, Grafana variables replaced)."""
    rules = [{"record": f"dashboard:expr_{i}", "expr": substitute_grafana_variables(expr)}
             for i, (_, expr) in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- alerts -----------------------------------------------------------------------------

def test_alerts_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert ALERTS <= set(names), f"missing alerts: {sorted(ALERTS - set(names))}"
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert "absent(inferq_live_workers)" in by_name["NoLiveWorker"]["expr"]
    for name in ("P99LatencyHigh", "P99TTFTHigh"):
        assert "histogram_quantile(0.99" in by_name[name]["expr"] and "[5m]" in by_name[name]["expr"]


def test_every_alert_is_unit_tested() -> None:
    tested = {case["alertname"] for test in load_yaml(ALERTS_TEST_YML)["tests"]
              for case in test.get("alert_rule_test", [])}
    firing = {case["alertname"] for test in load_yaml(ALERTS_TEST_YML)["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert names == tested, f"alerts without a test: {sorted(names - tested)}"
    assert names == firing, f"alerts never shown firing: {sorted(names - firing)}"


# --- metric names -----------------------------------------------------------------------

def test_metric_names_are_in_the_contract() -> None:
    used = {(where, name) for where, expr in dashboard_exprs() for name in metric_names(expr)}
    used |= {(rule["alert"], name) for rule in alert_rules() for name in metric_names(rule["expr"])}
    unknown = sorted((where, name) for where, name in used if not is_contract_name(name))
    assert not unknown, f"metric names no service exports: {unknown}"
    names = {histogram_base(name) for _, name in used}
    unused = sorted(MUST_BE_USED - names)
    assert not unused, f"contract metrics neither graphed nor alerted on: {unused}"


def test_metric_name_scan() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, endpoint) (rate(inferq_ttft_seconds_bucket{queue!~"a.b"}'
            '[$__rate_interval]))) > 1e9 or absent(vllm:kv_cache_usage_perc) and on(instance) up == 0')
    assert metric_names(expr) == {"inferq_ttft_seconds_bucket", "vllm:kv_cache_usage_perc", "up"}


# --- Grafana ----------------------------------------------------------------------------

def datasource_uid() -> str:
    sources = load_yaml(DATASOURCE_YML)["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    assert sources[0]["url"] == "http://prometheus:9090"
    return str(sources[0]["uid"])


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uid = datasource_uid()
    text = DASHBOARD_JSON.read_text()
    assert "${DS_" not in text, "use the provisioned datasource uid, not an import variable"
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len(panels) >= 20
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]


def test_dashboard_covers_the_required_views() -> None:
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD_JSON.read_text())["panels"])
    for words in ["request rate", "p50 / p95 / p99", "time to first token", "(api)", "(vllm",
                  "queue depth", "queue wait", "slots", "running / waiting", "kv cache", "tokens per second",
                  "gpu utilization", "gpu memory", "gpu temperature", "gpu power", "errors by status",
                  "rate-limit", "quota", "live workers"]:
        assert words in titles, f"no panel about {words!r}"


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    provider = load_yaml(DASHBOARD_PROVIDER_YML)["providers"][0]
    grafana = load_yaml(COMPOSE_FILE)["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# --- Compose ----------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_broken_file() -> None:
    """The schema really constrains services (guards against a vendored schema that accepts anything)."""
    schema = json.loads(SCHEMA.read_text())
    broken = {"services": {"api": {"image": "x", "helthcheck": {"test": ["CMD", "true"]}}}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_compose_services_and_health_checks() -> None:
    services = compose()["services"]
    assert SERVICES <= set(services), f"missing services: {sorted(SERVICES - set(services))}"
    for name, service in services.items():
        if service.get("restart") == "no":  # a one-shot step (migrations)
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no health check"
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "/health'" in api_check, "the API's container check is liveness (/health), not /ready"


def test_compose_environment_names_are_settings() -> None:
    from config.settings import Settings

    known = {name.upper() for name in Settings.model_fields}
    otel = set(compose()["x-otel-env"])  # OpenTelemetry's own variables (config/tracing.py)
    assert otel and all(name.startswith("OTEL_") for name in otel)
    env = compose()["x-inferq-env"]
    deployed_env = deployed()["x-inferq-env"]
    assert deployed_env["REDIS_URL"] == f"redis://:{FAKE_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    assert deployed_env["DATABASE_URL"] == (
        f"postgresql+psycopg://inferq_app:{FAKE_SECRETS['INFERQ_DB_PASSWORD']}@postgres:5432/inferq")
    assert set(env) <= known, f"not inferq settings: {sorted(set(env) - known)}"
    for name in ("worker", "worker-tp"):
        assert set(compose()["services"][name]["environment"]) - otel <= known


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_workers_are_pinned_to_gpus() -> None:
    services = compose()["services"]
    [worker] = gpu_devices(services["worker"])
    assert worker == {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    assert services["worker"]["environment"]["TP_SIZE"] == "1"
    tp = services["worker-tp"]
    assert tp["profiles"] == ["tp"]
    [devices] = gpu_devices(tp)
    assert devices["driver"] == "nvidia" and devices["device_ids"] == ["1", "2"]
    assert tp["environment"]["TP_SIZE"] == "2"
    [monitor] = gpu_devices(services["gpu-monitor"])
    assert monitor["driver"] == "nvidia" and "gpu" in monitor["capabilities"]


def resolve_inferq_command(argv: list[str]) -> click.Command:
    """The click command ``argv`` (after ``inferq``) runs; its options are parsed, nothing is run."""
    command: click.Command = inferq_main
    args = list(argv)
    ctx = click.Context(inferq_main, info_name="inferq")
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"`inferq {' '.join(argv)}`: no subcommand {args[0]!r}"
        command, args = sub, args[1:]
        ctx = click.Context(command, info_name=command.name, parent=ctx)
    command.make_context(command.name, args, parent=ctx.parent)  # raises on unknown options
    return command


def service_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for name, service in compose()["services"].items():
        for key in ("entrypoint", "command"):
            value = service.get(key)
            if value:
                argv = shlex.split(value) if isinstance(value, str) else list(value)
                commands.append((name, [interpolate(str(arg)) for arg in argv]))
    return commands


def dockerfile_cmds() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCKERFILES:
        for line in path.read_text().splitlines():
            if line.startswith("CMD "):
                found.append((path.name, json.loads(line[4:])))
    return found


def test_every_inferq_command_is_a_real_subcommand() -> None:
    commands = [(where, argv) for where, argv in service_commands() + dockerfile_cmds()
                if argv[0] == "inferq"]
    used = {where: resolve_inferq_command(argv[1:]).name for where, argv in commands}
    assert used == {"migrate": "upgrade", "api": "api", "coordinator": "coordinator", "worker": "worker",
                    "worker-tp": "worker",
                    "flower": "flower", "gpu-monitor": "gpu-monitor",
                    "Dockerfile.api": "api", "Dockerfile.worker": "worker"}


def test_command_check_rejects_unknown_subcommands_and_options() -> None:
    with pytest.raises(AssertionError):
        resolve_inferq_command(["serve"])
    with pytest.raises(click.UsageError):
        resolve_inferq_command(["api", "--no-such-option"])


def test_images() -> None:
    api = (COMPOSE / "Dockerfile.api").read_text()
    worker = (COMPOSE / "Dockerfile.worker").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", api, re.M)
    assert not re.search(r"pip install[^\n]*vllm", api), "the API image must not install an engine"
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:", worker, re.M) and "FROM ${VLLM_IMAGE}" in worker
    assert "ENTRYPOINT []" in worker  # the base image's entrypoint is `vllm serve`
    for service in ("api", "migrate", "flower"):
        assert compose()["services"][service]["build"]["dockerfile"] == "compose/Dockerfile.api"
    for service in ("worker", "worker-tp", "gpu-monitor"):
        assert compose()["services"][service]["build"]["dockerfile"] == "compose/Dockerfile.worker"


def test_images_copy_what_their_context_sends() -> None:
    """Each COPY source exists and is let through by the Dockerfile's own .dockerignore."""
    for dockerfile in DOCKERFILES:
        ignore = (COMPOSE / f"{dockerfile.name}.dockerignore").read_text().splitlines()
        allowed = {line[1:] for line in ignore if line.startswith("!")}
        assert "*" in ignore
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), (dockerfile.name, source)
                    assert source.rstrip("/") in allowed, (dockerfile.name, source)


def test_prometheus_scrapes_the_compose_services() -> None:
    config = load_yaml(PROMETHEUS_YML)
    assert config["rule_files"] == ["alerts.yml"]
    services = compose()["services"]
    jobs = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in config["scrape_configs"]}
    assert {"api", "coordinator", "worker", "gpu-monitor", "flower", "redis"} <= set(jobs)
    expected_ports = {"api": "8020", "coordinator": "9102", "worker": "9200", "gpu-monitor": "9101",
                      "flower": "5555", "redis": "9121"}
    for job, port in expected_ports.items():
        for target in jobs[job]:
            host, _, target_port = target.partition(":")
            assert host in services and target_port == port, (job, target)
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in mounts


def test_compose_interpolation_helper() -> None:
    missing: dict[str, str] = {}
    value = compose_interpolate("a${X:-d}${Y-e}${Z:?set Z}$${W}", {"Y": ""}, missing)
    assert value == "ad${W}" and missing == {"Z": "set Z"}
