"""Every benchmark script under benchmarks/ runs at a tiny size and prints its result as JSON on its last
line, so the scripts cannot rot unnoticed.

The ones that can use a test double (the scripted or paced engine) run in the fast suite; vs_vllm and
batch_bench's comparison with vLLM offline need the real engine (twice each) and are marked slow. Left
out of the slow suite, because each would add another minute or more of engine starts:
stack_vs_engine and cpu_split with the real engine (their scripted runs are here). ``inferq loadtest``
(loadtest/cli.py) is run by tests/test_loadtest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import redis

from benchmarks.stack import LiveWorkerError, free_port, private_stack, running_stack
from queueing import liveness
from tests.conftest import REAL_MODEL_DIR, ROOT

SCRIPTED = ("--env", "ENGINE=scripted", "--env", "SERVED_MODEL_NAME=scripted-bench")


def run_script(module: str, *args: str, timeout: float = 240, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m module args`` from the repository root; the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})
    assert proc.returncode == 0, \
        f"{module} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{module} printed nothing; stderr:\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    return result


def test_a_benchmark_refuses_to_share_a_redis_with_a_live_worker_of_its_model(
        redis_url: str, redis_client: redis.Redis) -> None:
    liveness.beat(redis_client, "bench-live-model", "someone-else", 30)
    try:
        with pytest.raises(LiveWorkerError, match="bench-live-model"), \
                running_stack(free_port(), 5, REDIS_URL=redis_url, SERVED_MODEL_NAME="bench-live-model"):
            pass
    finally:
        liveness.retire(redis_client, "bench-live-model", "someone-else")


def test_stack_vs_engine_scripted() -> None:
    out = run_script("benchmarks.stack_vs_engine", *SCRIPTED, "--concurrency", "2", "--requests", "4",
                     "--max-tokens", "4", "--pairs", "2")
    assert len(out["pairs"]) == 2
    for pair in out["pairs"]:
        assert pair["direct_tok_s"] > 0 and pair["stack_tok_s"] > 0
    stats = out["stats"]["ratio_tok_s"]
    assert stats["min"] <= stats["median"] <= stats["max"]
    assert out["settings"]["engine"] == "scripted" and out["settings"]["engine_argv"] == []


def test_cpu_split_scripted() -> None:
    out = run_script("benchmarks.cpu_split", *SCRIPTED, "--concurrency", "2", "--requests", "4",
                     "--max-tokens", "4")
    assert out["output_tokens_per_s"] > 0
    names = " ".join(row["process"] for row in out["cpu_percent"])
    assert "gunicorn" in names and "redis-server" in names and "benchmark client" in names
    assert names.count("redis-server") == 1  # its own Redis only, not every redis-server on the machine


def test_batch_bench_scripted() -> None:
    out = run_script("benchmarks.batch_bench", *SCRIPTED, "--lines", "6", "--max-tokens", "4", "--pairs", "2",
                     "--warmup", "2", "--warmup-lines", "2", "--probe-lines", "4", "--no-offline")
    assert out["settings"]["pairs"] == 2 and len(out["pairs"]) == 2
    for pair in out["pairs"]:
        assert pair["stack_tokens_per_s"] == pytest.approx(6 * 4 / pair["stack_seconds"])
        assert pair["offline_tokens_per_s"] is None and pair["ratio_tokens_per_s"] is None
    stats = out["stats"]["stack_tokens_per_s"]
    assert stats["min"] <= stats["median"] <= stats["max"]
    assert len(out["ttft_idle_ms"]) == 1


def test_plumbing() -> None:
    out = run_script("benchmarks.plumbing", "--requests", "20", "--warmup", "5", "--levels", "1",
                     "--rate-levels", "2", "--api-workers", "1", "--no-profile", "--pairs", "2")
    assert out["redis_ping_ms"] and [(lv["mode"], lv["concurrency"]) for lv in out["levels"]] == [
        ("buffered", 1), ("buffered", 2), ("stream", 1)]
    for level in out["levels"]:
        assert len(level["pairs"]) == 2 and level["failed"] == 0
        added = level["stats"]["added_p50_ms"]
        assert 0 < added["min"] <= added["median"] <= added["max"]
        assert all(p["engine_p50_ms"] < p["p50_ms"] for p in level["pairs"])


def test_token_path() -> None:
    out = run_script("benchmarks.token_path", "--streams", "8", "--pairs", "1", "--seconds", "2",
                     "--warmup", "1", "--tokens", "16")
    assert len(out["pairs"]) == 1
    assert out["pairs"][0]["engine_tokens_per_s"] > 0 and out["pairs"][0]["stack_delivered_per_s"] > 0
    assert "worker_us_per_token" in out["stats"]


def test_scale_out() -> None:
    out = run_script("benchmarks.scale_out", "--workers", "1,2", "--rounds", "2", "--concurrency", "4",
                     "--tokens", "4", "--delay", "0.01", "--duration", "2", "--warmup", "1", "--churn", "0")
    rounds = out["rounds"]
    assert [(r["round"], r["workers"]) for r in rounds] == [(1, 1), (1, 2), (2, 2), (2, 1)]  # alternated
    for run in rounds:
        assert run["live"] == run["workers"] and run["errors"] == {} and run["requests_per_s"] > 0
    for n, summary in out["summary"].items():
        rps = summary["requests_per_s"]
        assert rps["min"] <= rps["median"] <= rps["max"]
        assert summary["ratio_of_medians"] == pytest.approx(rps["median"] / out["summary"]["1"][
            "requests_per_s"]["median"], abs=0.002)
        assert summary["capacity"] == pytest.approx(int(n) * 8 / (4 * 0.01))


def test_soak() -> None:
    out = run_script("benchmarks.soak", "--requests", "40", "--concurrency", "4")
    assert out["requests"] == 40 and out["errors"] == {}


def test_sse_hold() -> None:
    out = run_script("benchmarks.sse_hold", "--connections", "8", "--tokens", "3", "--token-delay", "0.05",
                     "--ramp", "0.5")
    assert out["ok"] == 8 and out["errors"] == {}


def test_api_allocations() -> None:
    out = run_script("benchmarks.api_allocations", "--requests", "20", "--warmup", "5", "--top", "2")
    assert out["requests"] == 20 and len(out["top"]) <= 2


def test_ratelimit_accuracy() -> None:
    env = {"ENGINE": "scripted", "SERVED_MODEL_NAME": "scripted-bench"}
    with private_stack(None, 120, env=env) as stack:
        out = run_script("benchmarks.ratelimit_accuracy", "--base", stack.base, "--rpm", "3", "--rate", "5",
                         "--seconds", "2", env={"DATABASE_URL": stack.database_url})
    assert out["accepted"] == 3 and out["most_in_60s"] == 3 and out["refused"] >= 5


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL_DIR.exists(), reason="the real model is not prepared (make model)")
def test_batch_bench_real_engine_vs_offline() -> None:
    out = run_script("benchmarks.batch_bench", "--lines", "4", "--max-tokens", "4", "--pairs", "1",
                     "--warmup", "1", "--warmup-lines", "2", "--probe-lines", "0", timeout=900)
    engine = out["engine"]
    assert engine["same"] and engine["argv"] == engine["worker_argv"]
    assert engine["env"] == engine["worker_env"]
    assert engine["env"]["VLLM_CPU_KVCACHE_SPACE"] == out["settings"]["VLLM_CPU_KVCACHE_SPACE"]
    (pair,) = out["pairs"]
    assert pair["stack_tokens_per_s"] > 0 and pair["offline_tokens_per_s"] > 0
    ratio = pair["stack_tokens_per_s"] / pair["offline_tokens_per_s"]
    assert pair["ratio_tokens_per_s"] == pytest.approx(ratio)
    assert out["stats"]["ratio_tokens_per_s"]["median"] == pair["ratio_tokens_per_s"]


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL_DIR.exists(), reason="the real model is not prepared (make model)")
def test_vs_vllm_real_engine() -> None:
    out = run_script("benchmarks.vs_vllm", "--levels", "1", "--pairs", "1", "--requests", "2",
                     "--max-tokens", "4", "--warmup", "0", "--ready-timeout", "600", timeout=900)
    engine = out["engine"]
    assert engine["same_argv"] and engine["same_engine_env"]
    assert engine["vllm_engine_env"]["VLLM_CPU_KVCACHE_SPACE"] == engine["worker_engine_env"][
        "VLLM_CPU_KVCACHE_SPACE"]
    level = out["levels"]["1"]
    (pair,) = level["pairs"]
    assert pair["vllm_output_tok_s"] > 0 and pair["inferq_output_tok_s"] > 0
    assert pair["vllm_errors"] == 0 and pair["inferq_errors"] == 0
    assert pair["vllm_api_server_us_per_token"] > 0 and pair["inferq_worker_us_per_token"] > 0
    assert pair["cpu_ratio_worker_vs_vllm_api"] is not None
    assert level["stats"]["ratio_output_tok_s"]["median"] == pair["ratio_output_tok_s"]
