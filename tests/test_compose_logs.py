"""Logs and traces of the deployment in ``compose/`` (issue 13, part 5).

Loki, Alloy and Jaeger have no Debian package and no binary here, so their configs are parsed
(Alloy's with the small parser in ``tests/alloy_config.py``) and checked against what the other
side expects: the JSON fields config/logs.py writes, the Loki labels and structured metadata the dashboard
filters on, the span tag the worker sets, Grafana's ``$`` expansion in provisioning files.
``make logs`` runs with a stand-in ``docker``. The compose helpers are ``tests/compose_files.py``'s.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from config import logs
from tests.alloy_config import (
    ALLOY_CONFIG,
    ALLOY_EXPORTS,
    AlloyParser,
    AlloyRef,
    alloy_component,
    alloy_config,
    alloy_refs,
)
from tests.compose_files import (
    COMPOSE,
    DASHBOARD_JSON,
    DOCKERFILES,
    ROOT,
    compose,
    deployed,
    environment,
    load_yaml,
)
from tests.test_compose import service_commands

LOKI_YML = COMPOSE / "loki" / "loki.yaml"
DATASOURCES = COMPOSE / "grafana" / "provisioning" / "datasources"
LOGS_DASHBOARD_JSON = COMPOSE / "grafana" / "dashboards" / "inferq-logs.json"
PINNED_IMAGE = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+$")
def json_log_line(**context: str) -> dict[str, Any]:
    """A log line as an inferq service writes it with LOG_FORMAT=json (config/logs.py), parsed."""
    record = logging.LogRecord("api.generation.serving", logging.INFO, __file__, 1, "served %s", ("ok",),
                               None)
    for name, value in context.items():
        setattr(record, name, value)
    # In an empty context: no request or job id that an earlier test of this process left set.
    contextvars.Context().run(logs.ContextFilter().filter, record)
    line = logs.formatter("json").format(record)
    return {"line": line, **json.loads(line)}


def inferq_services() -> set[str]:
    """The compose services that run an inferq command (they write inferq's JSON lines)."""
    return {name for name, argv in service_commands() if argv[0] == "inferq"}


def test_alloy_parser_reads_blocks_and_rejects_what_it_does_not_know() -> None:
    text = 'a.b "x" {\n  k = [1, "s", c.d.e,]\n  o = { p = "q", "r s" = true }\n  n { }\n}\n'
    parsed = AlloyParser(text).parse()
    block = alloy_component(parsed, "a.b")
    assert block.label == "x" and block.attributes == {
        "k": [1.0, "s", AlloyRef("c.d.e")], "o": {"p": "q", "r s": True}}
    assert block.one("n").attributes == {}
    for broken in ('a { k = "x" k = "y" }', 'a { k = [1 2] }', 'a {', 'a { k = f(1) }', 'a { k = 1 + 2 }'):
        with pytest.raises(ValueError):
            AlloyParser(broken).parse()


def test_alloy_components_exist_and_every_reference_resolves() -> None:
    config = alloy_config()
    assert not config.attributes
    names = {f"{block.name}.{block.label}" for block in config.blocks}
    assert len(names) == len(config.blocks), "two components with the same name and label"
    for block in config.blocks:
        assert block.name in ALLOY_EXPORTS and block.label, f"unknown component {block.name}"
        for ref in alloy_refs(block):
            component, _, export = ref.path.rpartition(".")
            assert component in names, f"{block.name}: {ref.path} names no component"
            assert export in ALLOY_EXPORTS[component.rsplit(".", 1)[0]], f"{ref.path}: no such export"
    # The log path: Docker → relabel rules → process → write.
    source = alloy_component(config, "loki.source.docker")
    assert source.attributes["targets"] == AlloyRef("discovery.docker.inferq.targets")
    assert source.attributes["relabel_rules"] == AlloyRef("discovery.relabel.inferq.rules")
    assert source.attributes["forward_to"] == [AlloyRef("loki.process.inferq.receiver")]
    process = alloy_component(config, "loki.process")
    assert process.attributes["forward_to"] == [AlloyRef("loki.write.loki.receiver")]


def test_alloy_reads_this_projects_containers_through_the_mounted_socket() -> None:
    config, alloy = alloy_config(), compose()["services"]["alloy"]
    discovery = alloy_component(config, "discovery.docker")
    socket_url = "unix:///var/run/docker.sock"
    assert discovery.attributes["host"] == alloy_component(config, "loki.source.docker").attributes["host"]
    assert discovery.attributes["host"] == socket_url
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in alloy["volumes"]
    [project_filter] = discovery.all("filter")
    assert project_filter.attributes == {"name": "label",
                                         "values": [f"com.docker.compose.project={compose()['name']}"]}
    rules = {rule.attributes["target_label"]: rule.attributes
             for rule in alloy_component(config, "discovery.relabel").all("rule")}
    assert rules["service"]["source_labels"] == ["__meta_docker_container_label_com_docker_compose_service"]
    assert rules["container"]["source_labels"] == ["__meta_docker_container_name"]
    mounts = dict(v.split(":")[:2] for v in alloy["volumes"] if v.startswith("./"))
    assert mounts == {"./alloy/config.alloy": alloy["command"][-1]}
    assert alloy["command"][0] == "run" and "--disable-reporting" in alloy["command"]


def test_alloy_sends_request_and_job_ids_as_structured_metadata_to_loki() -> None:
    """The JSON fields Alloy extracts are the ones config/logs.py writes; the ids, one per
    request, become structured metadata, not labels; the push URL is the Loki of compose."""
    process = alloy_component(alloy_config(), "loki.process")
    [match] = process.all("stage.match")
    selector = re.fullmatch(r'\{service=~"([\w|-]+)"\}', match.attributes["selector"])
    assert selector, match.attributes["selector"]
    assert set(selector.group(1).split("|")) == inferq_services()
    stages = [stage.name for stage in match.blocks]
    assert stages == ["stage.json", "stage.labels", "stage.structured_metadata"]
    expressions = match.one("stage.json").attributes["expressions"]
    line = json_log_line(request_id="req-1", job_id="0f3c")
    for name, expression in expressions.items():
        assert (expression or name) in line, f"config/logs.py writes no {expression or name!r}"
    labels = set(match.one("stage.labels").attributes["values"])
    metadata = set(match.one("stage.structured_metadata").attributes["values"])
    assert labels == {"level"}, "labels must stay few-valued: ids go into structured metadata"
    assert {"request_id", "job_id"} <= metadata <= set(expressions)
    assert line["level"] == "INFO" and (line["request_id"], line["job_id"]) == ("req-1", "0f3c")

    [write] = [b for b in alloy_config().blocks if b.name == "loki.write"]
    url = urlsplit(write.one("endpoint").attributes["url"])
    assert (url.scheme, url.hostname, url.path) == ("http", "loki", "/loki/api/v1/push")
    assert url.port == load_yaml(LOKI_YML)["server"]["http_listen_port"]


def test_loki_keeps_structured_metadata_and_its_port_is_the_one_published() -> None:
    loki_config, loki = load_yaml(LOKI_YML), compose()["services"]["loki"]
    [schema] = loki_config["schema_config"]["configs"]
    assert (schema["store"], schema["schema"]) == ("tsdb", "v13"), "structured metadata needs TSDB and v13"
    assert loki_config["limits_config"]["allow_structured_metadata"] is True
    assert loki_config["auth_enabled"] is False
    compactor = loki_config["compactor"]
    assert compactor["retention_enabled"] is True and compactor["delete_request_store"] == "filesystem"
    assert loki_config["limits_config"]["retention_period"]
    port = loki_config["server"]["http_listen_port"]
    assert [p.rsplit(":", 1)[1] for p in loki["ports"]] == [str(port)]
    mounts = dict(v.split(":")[:2] for v in loki["volumes"] if v.startswith("./"))
    assert loki["command"] == [f"-config.file={mounts['./loki/loki.yaml']}"]
    assert f"{port}/ready" in " ".join(loki["healthcheck"]["test"])
    assert any(v.startswith("loki-data:") for v in loki["volumes"])


def test_log_and_trace_images_are_pinned() -> None:
    services = compose()["services"]
    for name in ("loki", "alloy", "jaeger"):
        assert PINNED_IMAGE.match(services[name]["image"]), services[name]["image"]
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger:2."), "v2: all-in-one with OTLP"


def test_api_and_workers_send_their_traces_to_jaegers_otlp_http_port() -> None:
    """config/tracing.py exports over OTLP/HTTP, whose port is 4318 (4317 is gRPC)."""
    assert "opentelemetry.exporter.otlp.proto.http" in (ROOT / "config" / "tracing.py").read_text()
    services = deployed()["services"]
    for name in ("api", "coordinator", "worker", "worker-tp"):
        assert environment(services[name])["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
    jaeger = services["jaeger"]
    assert {p.rsplit(":", 1)[1] for p in jaeger["ports"]} == {"16686", "4318"}
    assert environment(jaeger)["JAEGER_LISTEN_HOST"] == "0.0.0.0", "receivers reachable from other containers"
    assert "13133/status" in " ".join(jaeger["healthcheck"]["test"])
    for dockerfile in DOCKERFILES:  # the images install the `otel` extra, or tracing stays off
        [code] = re.findall(r'RUN python3? -c "(.*?)" \\$', dockerfile.read_text(), re.M)
        wanted = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
        assert {"opentelemetry-sdk>=1.25", "opentelemetry-exporter-otlp-proto-http>=1.25"} <= set(wanted)


def test_the_otlp_endpoint_is_a_base_url_the_exporter_appends_v1_traces_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compose sets OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318: the real exporter posts to /v1/traces."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    received: list[tuple[str, str]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
        provider.get_tracer("test").start_span("inferq.job").end()
        provider.shutdown()
    finally:
        server.shutdown()
    assert received == [("/v1/traces", "application/x-protobuf")]


def provisioned(name: str) -> dict[str, Any]:
    [source] = load_yaml(DATASOURCES / name)["datasources"]
    return dict(source)


def grafana_expansion_problems(value: Any, env: Mapping[str, str]) -> list[str]:
    """What Grafana's expansion of ${VAR} in the values of a provisioning file would blank: every
    $ must be $$ (a literal $) or ${NAME} with NAME in Grafana's environment."""
    if isinstance(value, dict):
        return [problem for item in value.values() for problem in grafana_expansion_problems(item, env)]
    if isinstance(value, list):
        return [problem for item in value for problem in grafana_expansion_problems(item, env)]
    if not isinstance(value, str):
        return []
    return [match.group() for match in re.finditer(r"\$(\{[^}]*\}|\w+)?", value.replace("$$", ""))
            if not (match.group(1) or "").startswith("{") or match.group(1)[1:-1] not in env]


def grafana_expand(value: str, env: Mapping[str, str]) -> str:
    """A provisioning value as Grafana reads it: ${NAME} from its environment, $$ a literal $."""
    parts = value.split("$$")
    return "$".join(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), part) for part in parts)


def test_grafana_expansion_check() -> None:
    assert grafana_expand("${URL}/a?v=$${__value.raw}&$$", {"URL": "http://h"}) == "http://h/a?v=${__value.raw}&$"
    assert grafana_expansion_problems("a $${__value.raw} ${URL} $$x", {"URL": "u"}) == []
    assert grafana_expansion_problems({"k": ["${__value.raw} $X ${NOPE}"]}, {}) == [
        "${__value.raw}", "$X", "${NOPE}"]


def test_loki_and_jaeger_datasources_link_logs_and_traces() -> None:
    loki, jaeger = provisioned("loki.yml"), provisioned("jaeger.yml")
    grafana_env = environment(deployed()["services"]["grafana"])
    for path in (DATASOURCES / "loki.yml", DATASOURCES / "jaeger.yml"):
        assert not grafana_expansion_problems(load_yaml(path), grafana_env), path.name
    assert (loki["type"], loki["url"], loki["editable"]) == ("loki", "http://loki:3100", False)
    assert (jaeger["type"], jaeger["url"], jaeger["editable"]) == ("jaeger", "http://jaeger:16686", False)
    ui_port = [p for p in deployed()["services"]["jaeger"]["ports"] if p.endswith(":16686")]
    assert ui_port == ["127.0.0.1:16686:16686"], "the UI the job_id link below opens"

    line = json_log_line(request_id="req-7.a", job_id="4b1d9e0c7a5f4e8e9c2b6d3a1f0e7c5b")["line"]
    unknown = json_log_line()["line"]  # "-": no request, no job
    fields = {field["name"]: field for field in loki["jsonData"]["derivedFields"]}
    for name, value in (("request_id", "req-7.a"), ("job_id", "4b1d9e0c7a5f4e8e9c2b6d3a1f0e7c5b")):
        pattern = re.compile(fields[name]["matcherRegex"])
        assert (match := pattern.search(line)) and match.group(1) == value, name
        assert not pattern.search(unknown), f"{name}: '-' must get no link"
    by_request = fields["request_id"]
    assert by_request["datasourceUid"] == loki["uid"]
    assert grafana_expand(by_request["url"], grafana_env) == '{service=~".+"} | request_id="${__value.raw}"'
    to_trace = urlsplit(grafana_expand(fields["job_id"]["url"], grafana_env))
    query = dict(parse_qsl(to_trace.query))
    assert (to_trace.scheme, to_trace.netloc, to_trace.path) == ("http", "127.0.0.1:16686", "/search")
    worker_cli = (ROOT / "workers" / "cli.py").read_text()
    assert f'init_tracing("{query["service"]}")' in worker_cli, "the worker's OpenTelemetry service name"
    assert json.loads(query["tags"]) == {"inferq.job_id": "${__value.raw}"}

    to_logs = jaeger["jsonData"]["tracesToLogsV2"]
    assert to_logs["datasourceUid"] == loki["uid"] and to_logs["customQuery"] is True
    tag = re.fullmatch(r'\{service=~"\.\+"\} \| job_id="\$\$\{__span\.tags\["([\w.]+)"\]\}"',
                       to_logs["query"])
    assert tag, to_logs["query"]
    assert f'"{tag.group(1)}": job_id' in (ROOT / "workers" / "runner.py").read_text(), "the job span's tag"


def test_logs_dashboard_filters_by_request_id_on_what_alloy_ships() -> None:
    dashboard = json.loads(LOGS_DASHBOARD_JSON.read_text())
    uid = provisioned("loki.yml")["uid"]
    assert dashboard["uid"] != json.loads(DASHBOARD_JSON.read_text())["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["request_id"]["type"] == "textbox" and variables["job_id"]["type"] == "textbox"
    assert variables["service"]["datasource"]["uid"] == uid
    assert variables["service"]["query"] == "label_values(service)"
    process = alloy_component(alloy_config(), "loki.process")
    [match] = process.all("stage.match")
    labels = {"service", "container"} | set(match.one("stage.labels").attributes["values"])
    metadata = set(match.one("stage.structured_metadata").attributes["values"])
    logs_panels = [panel for panel in dashboard["panels"] if panel["type"] == "logs"]
    assert logs_panels
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "loki", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"]["uid"] == uid
            assert re.search(r"\| request_id=~`\$\{request_id:regex\}\.\*`", expr), panel["title"]
            selector = re.match(r"[^{]*\{([^}]*)\}", expr)
            assert selector, expr
            used = {m.group(1) for m in re.finditer(r"(\w+)=~?", selector.group(1))}
            assert used <= labels, f"{panel['title']}: no such Loki label {used - labels}"
            filtered = set(re.findall(r"\| (\w+)=~", expr))
            assert filtered <= metadata, f"{panel['title']}: not structured metadata: {filtered - metadata}"
    assert any("request_id" in panel["title"] for panel in logs_panels)
    links = [link["url"] for link in json.loads(DASHBOARD_JSON.read_text())["links"]]
    assert f"/d/{dashboard['uid']}" in links, "the metrics dashboard links to the logs"


def test_alloy_health_check_reads_its_ready_endpoint(tmp_path: Path) -> None:
    """The image has bash but no curl or wget: the check speaks HTTP over bash's /dev/tcp."""
    check = compose()["services"]["alloy"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "bash", "-c"] and "127.0.0.1/12345" in check[3]
    status = {"code": 200}

    class Alloy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(status["code"] if self.path == "/-/ready" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Alloy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = check[3].replace("127.0.0.1/12345", f"127.0.0.1/{server.server_port}")
    try:
        assert subprocess.run(["bash", "-c", script], timeout=10).returncode == 0
        status["code"] = 503
        assert subprocess.run(["bash", "-c", script], timeout=10).returncode != 0
    finally:
        server.shutdown()


@pytest.mark.parametrize("binary", ["alloy", "loki"])
def test_configs_pass_their_own_tools_check(binary: str) -> None:
    """Where Alloy or Loki is installed (neither is packaged for Debian; not on this machine)."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (no Debian package): its config is parsed above instead")
    args = [path, "fmt", str(ALLOY_CONFIG)] if binary == "alloy" else [
        path, f"-config.file={LOKI_YML}", "-verify-config"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- make logs --------------------------------------------------------------------------

def make_logs(tmp_path: Path, compose_running: bool, **env: str) -> subprocess.Popen[str]:
    """``make logs`` with a stand-in ``docker`` that lists a container when ``compose_running``
    and prints the compose command it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text("#!/bin/sh\n"
                      f'if [ "$1" = ps ]; then {"echo 3f2a1b" if compose_running else "true"}; exit 0; fi\n'
                      'echo "docker $*"\n')
    docker.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    env.pop("MAKEFLAGS", None)
    command = ["make", "-s", "--no-print-directory", "-C", str(ROOT), "logs"]
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_make_logs_follows_the_compose_stack(tmp_path: Path) -> None:
    proc = make_logs(tmp_path, compose_running=True, LOGS_TAIL="20")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert out.strip() == "docker compose -f compose/compose.yaml logs -f --tail 20"


def test_make_logs_follows_the_file_inferq_run_was_teed_to(tmp_path: Path) -> None:
    log = tmp_path / "inferq-run.log"
    log.write_text("12:00:01 api    | first\n12:00:02 worker | second\n")
    proc = make_logs(tmp_path, compose_running=False, LOGS_FILE=str(log))
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(3)]
        with log.open("a") as more:
            more.write("12:00:03 worker | third, written while it follows\n")
        seen.append(proc.stdout.readline())
        assert proc.poll() is None, "it follows the file"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert seen[0].startswith(f"==> following {log}")
    assert [line.split("| ")[1].strip() for line in seen[1:]] == [
        "first", "second", "third, written while it follows"]


def test_make_logs_says_how_when_there_is_nothing_to_follow(tmp_path: Path) -> None:
    proc = make_logs(tmp_path, compose_running=False, LOGS_FILE=str(tmp_path / "none.log"))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert f"make run 2>&1 | tee -i {tmp_path / 'none.log'}" in out


def test_make_logs_is_a_phony_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M)
    assert phony and "logs" in phony.group(1).split()
    assert re.search(r"^logs:.*## ", makefile, re.M), "listed by make help"
