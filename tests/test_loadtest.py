"""``inferq loadtest``: statistics and workload units, and whole runs against a real stack
(gunicorn API, Redis, a Celery worker with the scripted engine, which emits exactly
``max_tokens`` tokens and counts one prompt token per word)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner
from rich.console import Console

from loadtest import display, stats
from loadtest.cli import clean_url, loadtest
from loadtest.driver import RequestResult, RunState, error_kind
from loadtest.workload import Workload, WorkloadError, jittered, read_prompts
from tests.conftest import ROOT, SCRIPTED_MODEL, TEST_KEY, start_api, start_coordinator

# --- statistics ---------------------------------------------------------------------------------


def test_percentiles_on_known_data():
    values = [float(v) for v in range(1, 101)]
    assert stats.percentile(values, 0) == 1
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 90) == pytest.approx(90.1)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile(values, 100) == 100
    assert stats.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert stats.percentile([7.0], 99) == 7
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_summary_and_aggregate():
    s = stats.summarize([0.4, 0.1, 0.3, 0.2])
    assert s is not None and (s.count, s.max, s.p50) == (4, 0.4, pytest.approx(0.25))
    assert s.mean == pytest.approx(0.25)
    assert s.as_ms()["p50"] == 250.0
    assert stats.summarize([]) is None

    ok = [RequestResult(start=i, latency=1.0, ttft=0.1, prompt_tokens=10, completion_tokens=10, max_tokens=10)
          for i in range(4)]
    kinds = ("401 invalid_api_key", "401 invalid_api_key", "ConnectError")
    bad = [RequestResult(start=0, latency=0.01, ttft=None, prompt_tokens=0, completion_tokens=0, max_tokens=9,
                         error=kind) for kind in kinds]
    agg = stats.aggregate(ok + bad, elapsed=2.0)
    assert (agg.completed, agg.failed) == (4, 3)
    assert agg.errors == {"401 invalid_api_key": 2, "ConnectError": 1}
    assert agg.requests_per_s == 2.0 and agg.output_tokens_per_s == 20.0 and agg.total_tokens_per_s == 40.0
    assert agg.itl is not None and agg.itl.p50 == pytest.approx(0.1)  # (1.0 - 0.1) / (10 - 1)
    assert agg.latency is not None and agg.latency.max == 1.0  # failures stay out of the distributions


def test_itl_needs_two_tokens_and_a_ttft():
    assert RequestResult(0, 1.0, 0.5, 1, 1, 1).itl is None
    assert RequestResult(0, 1.0, None, 1, 5, 5).itl is None
    assert RequestResult(0, 1.0, 0.2, 1, 5, 5).itl == pytest.approx(0.2)


def test_error_kind():
    assert error_kind(401, {"error": {"code": "invalid_api_key", "type": "invalid_request_error"}}) \
        == "401 invalid_api_key"
    assert error_kind(400, {"error": {"code": 400, "type": "BadRequestError"}}) == "400 BadRequestError"
    assert error_kind(502, None) == "502"


def test_clean_url_drops_credentials():
    assert clean_url("http://user:sk-secret@host:8000/v1/?api_key=x") == "http://host:8000/v1"


# --- workload -----------------------------------------------------------------------------------


def test_jitter_bounds():
    rng = random.Random(1)
    draws = [jittered(100, 0.2, rng) for _ in range(2000)]
    assert min(draws) >= 80 and max(draws) <= 120
    assert len(set(draws)) > 20
    assert all(jittered(64, 0.0, rng) == 64 for _ in range(10))
    assert all(jittered(1, 0.9, rng) >= 1 for _ in range(100))
    with pytest.raises(WorkloadError):
        jittered(10, 1.0, rng)


def test_synthetic_workload_lengths():
    w = Workload(prompt_tokens=50, max_tokens=20, jitter=0.5, seed=7)
    specs = [w.next() for _ in range(200)]
    assert all(25 <= len((s.prompt or "").split()) <= 75 for s in specs)
    assert all(10 <= s.max_tokens <= 30 for s in specs)
    again = Workload(prompt_tokens=50, max_tokens=20, jitter=0.5, seed=7)
    assert [again.next() for _ in range(200)] == specs  # the seed makes it reproducible


def test_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there"}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}\n')
    w = Workload(prompt_tokens=1, max_tokens=9, prompts_file=path)
    first, second, third = w.next(), w.next(), w.next()
    assert (first.prompt, first.max_tokens) == ("hello there", 9)
    assert first.as_messages() == [{"role": "user", "content": "hello there"}]
    assert second.as_messages() == [{"role": "user", "content": "hi"}] and second.max_tokens == 5
    assert second.as_prompt() == "hi"
    assert third == first  # cycles


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a"', "line 2: not valid JSON"),
    ('["a"]', "line 2: expected a JSON object"),
    ('{"text": "a"}', "line 2: needs exactly one of 'prompt'"),
    ('{"prompt": "a", "max_tokens": 0}', "line 2: 'max_tokens' must be a positive integer"),
    ('{"messages": [{"content": "a"}]}', "line 2: 'messages' must be a non-empty list"),
])
def test_bad_prompts_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=message):
        read_prompts(path)
    result = CliRunner().invoke(loadtest, ["--api-key", "k", "--model", "m", "--prompts", str(path)])
    assert result.exit_code == 2 and "line 2" in result.output


def test_stream_flag_only_for_completions():
    result = CliRunner().invoke(loadtest, ["--api-key", "k", "--model", "m", "--mode", "chat", "--stream"])
    assert result.exit_code == 2 and "--mode completions" in result.output


def test_live_view_renders():
    state = RunState(warmup=0, requests=10)
    state.results.append(RequestResult(0.0, 0.5, 0.1, 3, 4, 4))
    state.results.append(RequestResult(0.1, 0.1, None, 0, 0, 4, error="503 queue_full"))
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    console.print(display.live_view(state, "inferq loadtest: chat-stream on m"))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    for text in ("inferq loadtest: chat-stream on m", "in flight", "out tok/s", "p95", "TTFT", "ITL",
                 "503 queue_full: 1"):
        assert text in out


# --- whole runs against the stack ---------------------------------------------------------------


@pytest.fixture(scope="module")
def api_stack(redis_url, scripted_worker, tmp_path_factory):
    """An API under gunicorn (its base URL and directory: its database and files)."""
    tmp = tmp_path_factory.mktemp("api-loadtest")
    api, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL, FILES_DIR=str(tmp / "files"))
    yield base, tmp
    api.stop()


@pytest.fixture
def api_v1(api_stack):
    return api_stack[0] + "/v1"


def run_cli(api_v1, tmp_path, *args, key=TEST_KEY, exit_code=0):
    out = tmp_path / "report.json"
    argv = ["--base-url", api_v1, "--api-key", key, "--model", SCRIPTED_MODEL, "--no-live",
            "--json-out", str(out), *args]
    result = CliRunner().invoke(loadtest, argv)
    assert result.exit_code == exit_code, (result.output, result.exception)
    return json.loads(out.read_text())


def assert_clean_run(rep, n, max_tokens, prompt_words):
    assert rep["requests"] == {"completed": n, "failed": 0, "total": n, "warmup": 0}
    assert rep["errors"] == {}
    assert rep["tokens"] == {"prompt": n * prompt_words, "completion": n * max_tokens,
                             "completion_requested": n * max_tokens}
    assert rep["throughput"]["requests_per_s"] > 0 and rep["throughput"]["output_tokens_per_s"] > 0
    assert rep["latency_ms"]["count"] == n


def test_chat_stream_in_a_subprocess(api_v1, tmp_path):
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k not in ("INFERQ_API_KEY", "OPENAI_API_KEY")}
    proc = subprocess.run(
        [sys.executable, "-m", "inferq.cli", "loadtest", "--base-url", api_v1, "--api-key", TEST_KEY,
         "--no-live", "--requests", "40", "--concurrency", "8", "--max-tokens", "8", "--prompt-tokens", "16",
         "--json-out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inferq loadtest report" in proc.stdout
    rep = json.loads(out.read_text())
    assert_clean_run(rep, 40, 8, 16)
    s = rep["settings"]
    assert s["model"] == SCRIPTED_MODEL  # from GET /models
    assert (s["mode"], s["concurrency"], s["requests"], s["stream"]) == ("chat-stream", 8, 40, True)
    assert TEST_KEY not in out.read_text()
    assert rep["machine"]["cpu_count"] == os.cpu_count()
    for q in ("p50", "p90", "p95", "p99", "max"):  # each request's TTFT is within its latency
        assert 0 < rep["ttft_ms"][q] <= rep["latency_ms"][q]
    assert rep["itl_ms"]["count"] == 40


@pytest.mark.parametrize("mode, extra, streamed", [
    ("chat", [], False),
    ("completions", [], True),
    ("completions", ["--no-stream"], False),
])
def test_modes(api_v1, tmp_path, mode, extra, streamed):
    rep = run_cli(api_v1, tmp_path, "--mode", mode, *extra, "--requests", "40", "--concurrency", "8",
                  "--max-tokens", "6", "--prompt-tokens", "12", "--ignore-eos")
    assert_clean_run(rep, 40, 6, 12)
    assert rep["settings"]["stream"] is streamed
    if streamed:
        assert rep["ttft_ms"]["count"] == 40 and rep["ttft_ms"]["p99"] <= rep["latency_ms"]["p99"]
    else:
        assert rep["ttft_ms"] is None and rep["itl_ms"] is None


def test_jittered_lengths_are_generated_in_full(api_v1, tmp_path):
    rep = run_cli(api_v1, tmp_path, "--requests", "30", "--concurrency", "6", "--max-tokens", "10",
                  "--prompt-tokens", "20", "--length-jitter", "0.5", "--seed", "3")
    assert rep["requests"]["completed"] == 30
    assert rep["tokens"]["completion"] == rep["tokens"]["completion_requested"] != 300


def test_wrong_key_counts_errors_by_kind(api_v1, tmp_path):
    rep = run_cli(api_v1, tmp_path, "--requests", "20", "--concurrency", "4", key="iq-wrong-0000000000000000")
    assert rep["requests"]["completed"] == 0 and rep["requests"]["failed"] == 20
    assert rep["errors"] == {"401 invalid_api_key": 20}
    assert rep["latency_ms"] is None
    run_cli(api_v1, tmp_path, "--requests", "2", "--fail-on-error", key="iq-wrong-0000000000000000",
            exit_code=1)


def test_open_loop_rate(api_v1, tmp_path):
    rep = run_cli(api_v1, tmp_path, "--rate", "40", "--requests", "20", "--concurrency", "4",
                  "--max-tokens", "4", "--prompt-tokens", "8", "--seed", "1")
    assert_clean_run(rep, 20, 4, 8)
    assert rep["settings"]["rate"] == 40 and rep["queued_ms"]["count"] == 20
    assert rep["duration_s"] > 0.1  # 20 Poisson arrivals at 40/s take about half a second


def test_warmup_and_duration_with_itl(api_v1, tmp_path):
    prompts = tmp_path / "slow.jsonl"
    prompts.write_text(json.dumps({"prompt": "[[delay=0.02]] count slowly", "max_tokens": 5}) + "\n")
    rep = run_cli(api_v1, tmp_path, "--mode", "completions", "--prompts", str(prompts), "--warmup", "0.5",
                  "--duration", "1.5", "--concurrency", "4")
    assert rep["requests"]["warmup"] >= 4 and rep["requests"]["completed"] >= 4
    assert rep["requests"]["failed"] == 0
    assert rep["tokens"]["completion"] == 5 * rep["requests"]["completed"]
    assert rep["itl_ms"]["p50"] >= 15  # the engine waits 20 ms between tokens
    assert 1.0 < rep["duration_s"] < 10


def test_batch_mode(api_v1, api_stack, redis_url, tmp_path):
    _, api_tmp = api_stack
    coordinator = start_coordinator(redis_url, api_tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL,
                                    FILES_DIR=str(api_tmp / "files"))  # it dispatches the batch
    try:
        rep = run_cli(api_v1, tmp_path, "--mode", "batch", "--requests", "5", "--max-tokens", "3",
                      "--prompt-tokens", "4")
    finally:
        coordinator.stop()
    assert rep["batch"]["status"] == "completed"
    assert rep["requests"] == {"completed": 5, "failed": 0, "total": 5, "warmup": 0}
    assert rep["tokens"] == {"prompt": 20, "completion": 15}
    assert rep["throughput"]["lines_per_s"] > 0 and rep["throughput"]["output_tokens_per_s"] > 0
    assert rep["errors"] == {}


def test_live_display_and_json_on_stdout(api_v1, tmp_path):
    prompts = tmp_path / "slow.jsonl"
    prompts.write_text(json.dumps({"prompt": "[[delay=0.05]] go", "max_tokens": 6}) + "\n")
    result = CliRunner().invoke(loadtest, [
        "--base-url", api_v1, "--api-key", TEST_KEY, "--model", SCRIPTED_MODEL, "--live", "--json",
        "--prompts", str(prompts), "--requests", "8", "--concurrency", "4"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, (result.output, result.exception)
    rep = json.loads(result.stdout)  # stdout holds only the JSON; the display went to stderr
    assert rep["requests"]["completed"] == 8
    assert "\x1b[" in result.stderr  # a terminal display
    for text in ("inferq loadtest: chat-stream on scripted-model", "in flight", "out tok/s", "p95",
                 "inferq loadtest report"):
        assert text in result.stderr
