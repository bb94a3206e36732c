"""A real Prometheus scraping a real stack: every dashboard query and alert rule has data.

The stack: the session's real vLLM worker (``real_stack``), an API of this module (with
a low per-IP limit so that a rejection can be provoked), Flower, the GPU exporter and,
when the Debian ``prometheus-redis-exporter`` is installed, the Redis exporter. The
Prometheus config is compose/prometheus/prometheus.yml with each job's targets rewritten
to those local processes, a 1 s scrape interval and alerts.yml loaded.

After some traffic (chat and completions, streaming and not, a bad key, a job, a request
over a key's token limit, too many probes from one address) every PromQL expression of
the Grafana dashboard and of alerts.yml must parse and return at least one series.
Alert expressions are evaluated without their thresholds (see ``without_comparisons``):
a healthy stack fires no alert, but the signal each alert watches must exist.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from tests.compose_files import ALERTS_YML, PROMETHEUS_YML
from tests.conftest import (
    REAL_MODEL,
    TEST_KEY,
    Process,
    base_env,
    free_port,
    start_api,
    start_coordinator,
    wait_for,
)
from tests.test_compose import alert_rules, dashboard_exprs, metric_names, substitute_grafana_variables

pytestmark = pytest.mark.slow

# Grafana's $__rate_interval is at least four scrape intervals; the traffic below is recent.
LIVE_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
# Per-GPU series: this machine has no GPU, so the exporter reports inferq_gpu_up 0 and none of these.
PER_GPU_METRICS = frozenset({
    "inferq_gpu_utilization_percent", "inferq_gpu_memory_used_bytes", "inferq_gpu_memory_free_bytes",
    "inferq_gpu_memory_total_bytes", "inferq_gpu_power_watts", "inferq_gpu_temperature_celsius",
    "inferq_gpu_sm_clock_hertz", "inferq_gpu_ecc_uncorrected_errors",
})
COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?(?:\d+\.?\d*(?:e[+-]?\d+)?|\.\d+)\b", re.I)


def without_comparisons(expr: str) -> str:
    """An alert expression with every ``<op> <number>`` removed: ``x > 0.85`` becomes ``x``.

    Our rules compare a signal with a literal threshold (``a / b > 0.05``,
    ``x == 0 or absent(x)``), so what remains is the signal itself. Label matchers
    (``!=``, ``=~``) never precede a bare number and are left alone.
    """
    return COMPARISON.sub("", expr)


def test_without_comparisons() -> None:
    assert without_comparisons("max by (q) (d{q!~\"a\"}) > 50") == "max by (q) (d{q!~\"a\"})"
    assert (without_comparisons("max by (m) (w) == 0\n  or absent(w)") == "max by (m) (w)\n  or absent(w)")
    assert without_comparisons("x < 2147483648") == "x"
    assert without_comparisons('up{job!="worker"} == 0') == 'up{job!="worker"}'
    assert without_comparisons("histogram_quantile(0.99, r) > 5") == "histogram_quantile(0.99, r)"


def host_port(url: str) -> str:
    parsed = urlparse(url)
    return f"{parsed.hostname}:{parsed.port}"


def start_http_process(argv: list[str], env: dict[str, str], log: Path, url: str, what: str,
                       ok: Any = lambda r: r.is_success, timeout: float = 60) -> Process:
    proc = Process(argv, env, log)
    try:
        wait_for(lambda: ok(httpx.get(url, timeout=2)), timeout, what, proc.proc)
    except Exception:
        proc.stop()
        print(proc.log_tail())
        raise
    return proc


def prometheus_config(targets: dict[str, list[str]], tmp: Path) -> Path:
    """compose/prometheus/prometheus.yml with local targets, 1 s intervals and alerts.yml."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs - {"redis"} <= set(targets), f"no local target for jobs {sorted(jobs - set(targets))}"
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS_YML)]
    config["scrape_configs"] = [
        {**job, "scrape_interval": "1s", "scrape_timeout": "1s",
         "static_configs": [{"targets": targets[job["job_name"]]}]}
        for job in config["scrape_configs"] if job["job_name"] in targets
    ]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def live(real_stack: dict[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("prometheus-live")
    env = base_env(redis_url, tmp)
    procs: list[Process] = []
    try:
        api, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=REAL_MODEL, FILES_DIR=str(tmp / "files"),
                              IP_RATE_LIMIT="3/minute")
        procs.append(api)
        flower_port, gpu_port, prom_port = free_port(), free_port(), free_port()
        procs.append(start_http_process(
            [sys.executable, "-m", "inferq.cli", "flower", "--port", str(flower_port)],
            env, tmp / "flower.log", f"http://127.0.0.1:{flower_port}/healthcheck", "Flower"))
        procs.append(start_http_process(
            [sys.executable, "-m", "inferq.cli", "gpu-monitor", "--port", str(gpu_port), "--interval", "1"],
            env, tmp / "gpu-monitor.log", f"http://127.0.0.1:{gpu_port}/metrics", "gpu-monitor"))
        # A coordinator drains the usage stream, so the settled tokens (inferq_tokens_total) show up
        # on its metrics (an API that answers /v1/usage drains too, and counts them on its own).
        coordinator_port = free_port()
        procs.append(start_coordinator(redis_url, tmp, SERVED_MODEL_NAME=REAL_MODEL,
                                       FILES_DIR=str(tmp / "files"),
                                       COORDINATOR_METRICS_PORT=str(coordinator_port)))
        targets = {
            "prometheus": [f"127.0.0.1:{prom_port}"], "api": [host_port(base), host_port(real_stack["base"])],
            "coordinator": [f"127.0.0.1:{coordinator_port}"],
            "worker": [host_port(real_stack["metrics"])], "gpu-monitor": [f"127.0.0.1:{gpu_port}"],
            "flower": [f"127.0.0.1:{flower_port}"],
        }
        exporter = shutil.which("prometheus-redis-exporter") or shutil.which("redis_exporter")
        if exporter is not None:  # without it the redis job and its expressions are left out
            redis_port = free_port()
            procs.append(start_http_process(
                [exporter, "-redis.addr", redis_url, "-web.listen-address", f"127.0.0.1:{redis_port}"],
                env, tmp / "redis-exporter.log", f"http://127.0.0.1:{redis_port}/metrics", "redis_exporter"))
            targets["redis"] = [f"127.0.0.1:{redis_port}"]
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run `make install` (Debian package prometheus)")
        prom = f"http://127.0.0.1:{prom_port}"
        procs.append(start_http_process(
            [binary, f"--config.file={prometheus_config(targets, tmp)}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--log.level=warn"],
            env, tmp / "prometheus.log", f"{prom}/-/ready", "Prometheus"))
        count = sum(len(hosts) for hosts in targets.values())
        wait_for(lambda: len(query(prom, "up == 1")) == count, 30, "every target scraped")
        yield {"api": base, "prometheus": prom, "targets": targets, "redis_exporter": exporter is not None,
               "env": env}
    finally:
        for proc in reversed(procs):
            proc.stop()


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    """The instant vector (or scalar) ``expr`` gives now; fails on a PromQL error."""
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert body["status"] == "success", f"{expr!r}: {body.get('error')}"
    result = body["data"]["result"]
    return result if body["data"]["resultType"] in {"vector", "matrix"} else [result]


def send_traffic(base: str, env: dict[str, str]) -> None:
    """Requests of every kind the dashboard shows, good and refused."""
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    chat = {"model": REAL_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Say hi"}]}
    completion = {"model": REAL_MODEL, "max_tokens": 8, "prompt": "The capital of France is"}
    with httpx.Client(base_url=base, headers=auth, timeout=120) as client:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
            assert client.post(path, json=body).status_code == 200
            with client.stream("POST", path, json={**body, "stream": True}) as stream:
                assert stream.status_code == 200
                assert "data: [DONE]" in "".join(stream.iter_text())
        job = client.post("/v1/jobs", json={"endpoint": "/v1/chat/completions", "body": chat})
        assert job.status_code == 202, job.text
        done = client.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 60}).json()
        assert done["status"] == "succeeded", done
    assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=10,
                      headers={"Authorization": "Bearer iq-not-a-key-0000000000000"}).status_code == 401
    # A key with a tokens-per-minute limit below one request's worst case: token_limit.
    created = subprocess.run([sys.executable, "-m", "inferq.cli", "keys", "create", "--name", "live-tpm",
                              "--tpm", "4", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    refused = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=10,
                         headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 429, refused.text
    # More probes than IP_RATE_LIMIT (3/minute) allows: ip_limit.
    assert 429 in {httpx.get(f"{base}/health", timeout=5).status_code for _ in range(5)}


def evaluate(prom: str, exprs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Each (where, expr) sorted into "data" or "empty"."""
    found: dict[str, list[tuple[str, str]]] = {"data": [], "empty": []}
    for where, expr in exprs:
        found["data" if query(prom, expr) else "empty"].append((where, expr))
    return found


def test_every_dashboard_and_alert_expression_has_data(live: dict[str, Any]) -> None:
    prom = live["prometheus"]
    send_traffic(live["api"], live["env"])

    exprs = [(f"panel {title!r}", substitute_grafana_variables(expr, LIVE_GRAFANA_VARIABLES))
             for title, expr in dashboard_exprs()]
    exprs += [(f"alert {rule['alert']}", without_comparisons(rule["expr"])) for rule in alert_rules()]

    # No GPU on this machine: the exporter runs, says NVML is not up and lists no GPU, so
    # the per-GPU expressions may be empty. On a GPU host they must have data too.
    gpu_up = query(prom, "inferq_gpu_up")
    assert len(gpu_up) == 1
    no_gpu = gpu_up[0]["value"][1] == "0"
    may_be_empty = {expr for _, expr in exprs if no_gpu and metric_names(expr) <= PER_GPU_METRICS}
    if not live["redis_exporter"]:  # redis_exporter not installed: its series cannot exist
        may_be_empty |= {expr for _, expr in exprs if all(n.startswith("redis_") for n in metric_names(expr))}

    deadline = time.monotonic() + 45  # counters and histograms need two scrapes after the traffic
    while True:
        found = evaluate(prom, exprs)
        missing = [(where, expr) for where, expr in found["empty"] if expr not in may_be_empty]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    print("\nexpressions without series:", *[f"  {w}: {e}" for w, e in found["empty"]], sep="\n")
    assert not missing, "expressions without series:\n" + "\n".join(f"{w}: {e}" for w, e in missing)


def test_alert_rules_evaluate_without_errors_and_stay_quiet(live: dict[str, Any]) -> None:
    prom = live["prometheus"]
    wait_for(lambda: all(rule.get("lastEvaluation", "").startswith("20") for rule in rules(prom)), 20,
             "alert rules evaluated")
    for rule in rules(prom):
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    states = {rule["name"]: rule["state"] for rule in rules(prom)}
    print("\nalert states:", states)
    # A CPU-only machine has no NVML: that alert is pending (then firing) by design. Latency
    # alerts may be pending on a slow CPU; none can fire within their `for` here.
    assert {name for name, state in states.items() if state == "firing"} <= {"GPUMonitorNoNVML"}, states
    for name in ("NoLiveWorker", "WorkerDown", "TargetDown", "RedisDown", "ErrorRatioHigh", "QueueDepthHigh",
                 "KVCacheHigh", "KVCacheCritical"):
        assert states[name] == "inactive", (name, states[name])
    # The dashboard groups API requests by their `path` label (api/http/metrics.py fills it with
    # the matched Flask route, so job ids do not multiply the series).
    routes = query(prom, "count by (path) (flask_http_request_duration_seconds_count)")
    assert routes and all(series["metric"].get("path") for series in routes), routes
    assert not any("<" not in r["metric"]["path"] and "/v1/jobs/" in r["metric"]["path"] for r in routes)
    # vLLM's series keep their `vllm:` names (prometheus.yml renames what the client escaped).
    assert query(prom, 'count({__name__=~"vllm:.+"})')
    assert not query(prom, 'count({__name__=~"vllm_.+"})')
    targets = httpx.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"] for t in targets if t["health"] == "up"} == set(live["targets"])


def rules(prom: str) -> list[dict[str, Any]]:
    groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]
