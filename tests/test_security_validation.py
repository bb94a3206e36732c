"""Validation costs O(size) and bounded memory (issue 15, H2).

JSON bodies and batch input lines are capped in values (MAX_JSON_ELEMENTS) and depth
(MAX_JSON_DEPTH), counted on the raw text before it is parsed; the lone-surrogate check reads
the parsed body in one pass holding one iterator per level. Before, the check built a path
string and a tuple for every value: a 4 MiB chat body cost about 2 s and 270 MB, and 15 sent at
once stalled the gunicorn worker for half a minute.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.http import json_limits
from api.http.json_limits import JSONLimitError, JSONLimits, over_limits
from api.http.surrogates import lone_surrogate_at
from tests.conftest import ROOT, SCRIPTED_MODEL, TEST_KEY, Process, start_api

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
MiB = 1024 * 1024
LIMITS = JSONLimits(max_elements=500_000, max_depth=64)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SCRIPTED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
            **fields}


def padded_chat(pad: bytes) -> bytes:
    """A chat body with the raw JSON ``pad`` in an extra field (which admission ignores)."""
    return json.dumps(chat()).encode()[:-1] + b', "pad": ' + pad + b"}"


ZEROS_4MIB = padded_chat(b"[" + b"0," * (2 * MiB - 100) + b"0]")  # 2 million values, just under 4 MiB
DEEP_4MIB = padded_chat(b"[" * (2 * MiB - 100) + b"]" * (2 * MiB - 100))


# --- the caps, on the raw text ---------------------------------------------------------------


def _depth_and_values(value: Any, depth: int = 1) -> tuple[int, int]:
    """Nesting depth and values as the scan counts them: each container, and each separator."""
    if isinstance(value, (list, dict)):
        items = list(value.values() if isinstance(value, dict) else value)
        inner = [_depth_and_values(item, depth + 1) for item in items]
        return (max([depth, *(d for d, _ in inner)]),
                1 + max(len(items) - 1, 0) + sum(n for _, n in inner))
    return depth - 1, 0


TRICKY_TEXT = st.text(st.sampled_from(list('ab\\"[]{},: é😀\n/')), max_size=10)
JSON_VALUES = st.recursive(
    st.none() | st.integers() | st.floats(allow_nan=False) | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TRICKY_TEXT, inner, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(1, 9), st.booleans())
def test_the_scan_counts_what_the_parser_builds(value: Any, window: int, ascii_only: bool) -> None:
    """Strings hold brackets, commas, quotes and backslashes; windows of a few bytes cut them
    anywhere: the counts are those of the parsed value, exactly."""
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    depth, values = _depth_and_values(value)
    original = json_limits.WINDOW
    json_limits.WINDOW = window
    try:
        assert over_limits(text, JSONLimits(values, depth)) is None
        if depth:
            assert "deeper than" in (over_limits(text, JSONLimits(10**9, depth - 1)) or "")
        if values:
            assert "more than" in (over_limits(text, JSONLimits(values - 1, 10**9)) or "")
    finally:
        json_limits.WINDOW = original


@pytest.mark.parametrize(("text", "phrase"), [
    (DEEP_4MIB, "nests deeper than 64 levels (MAX_JSON_DEPTH)"),
    (ZEROS_4MIB, "holds more than 500000 values (MAX_JSON_ELEMENTS)"),
    (b"[" + b"[]," * 1_400_000 + b"[]]", "holds more than 500000 values"),
    (json.dumps({"pad": ["x"] * 600_000}).encode(), "holds more than 500000 values"),
    (("[" * 70 + "]" * 70).encode("utf-16"), "nests deeper than"),  # JSON in UTF-16 is transcoded
], ids=["deep", "zeros", "empty arrays", "strings", "utf-16"])
def test_huge_or_deep_json_is_refused_quickly_without_parsing(text: bytes, phrase: str) -> None:
    started = time.perf_counter()
    with pytest.raises(JSONLimitError, match=re.escape(phrase)):
        json_limits.loads(text, LIMITS)
    took = time.perf_counter() - started
    tracemalloc.start()
    with pytest.raises(JSONLimitError):
        json_limits.loads(text, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert took < 0.25, took
    assert peak < 6 * MiB, peak  # a few copies of one window of text, never the parsed values


def test_json_under_the_caps_parses_as_json_loads_does() -> None:
    text = json.dumps({"a": [1, 2.5, None, True, "x,[{"], "b": {"c": "é😀\\\""}}).encode()
    assert json_limits.loads(text, LIMITS) == json.loads(text)
    assert json_limits.loads(b"[" * 64 + b"]" * 64, LIMITS) is not None  # exactly the depth cap
    assert len(json_limits.loads(b"[" + b"0," * 499_999 + b"0]", LIMITS)) == 500_000  # and the value cap


# --- the lone-surrogate check ------------------------------------------------------------------


@pytest.mark.parametrize(("data", "path"), [
    ({"messages": [{"role": "user", "content": "é😀"}]}, None),
    ({"a": ["x", {"b": "\ud800"}]}, "a.1.b"),
    ({"metadata": {"k\udfff": "v"}}, "metadata.k\udfff"),
    ({"a": [1, "x", "é\udc00", 2]}, "a.2"),
    ({"pad": [0] * 20 + [["é"] * 20 + ["\ud800"]]}, "pad.20.20"),
    ("\ud800", ""),
], ids=["text", "nested", "key", "mixed list", "long lists", "root"])
def test_lone_surrogates_are_found_with_their_path(data: Any, path: str | None) -> None:
    assert lone_surrogate_at(data) == path


@pytest.mark.parametrize("shape", ["zeros", "empty arrays", "small objects", "strings"])
def test_the_surrogate_check_holds_one_iterator_per_level(shape: str) -> None:
    """Half a million values, the most MAX_JSON_ELEMENTS admits: the old walk held a path string
    and a tuple for each (about 65 MB here) and took a second."""
    pad: list[Any] = {"zeros": lambda: [0] * 500_000,
                      "empty arrays": lambda: [[] for _ in range(500_000)],
                      "small objects": lambda: [{"role": "user", "content": "é"} for _ in range(200_000)],
                      "strings": lambda: ["é"] * 500_000}[shape]()
    data = {"model": "m", "pad": [pad]}
    started = time.perf_counter()
    assert lone_surrogate_at(data) is None
    took = time.perf_counter() - started
    tracemalloc.start()
    lone_surrogate_at(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < MiB // 4, peak
    assert took < 0.5, took


# --- through the app ----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "phrase"), [
    (ZEROS_4MIB, "more than 500000 values (MAX_JSON_ELEMENTS)"),
    (DEEP_4MIB, "deeper than 64 levels (MAX_JSON_DEPTH)"),
], ids=["huge array", "deep array"])
def test_a_huge_or_deep_body_is_an_openai_400_naming_the_cap(client: Any, body: bytes, phrase: str) -> None:
    started = time.perf_counter()
    resp = client.post(CHAT, data=body, headers=JSON_AUTH)
    assert time.perf_counter() - started < 1.0
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert phrase in error["message"]


def test_an_upload_line_over_the_caps_is_refused_naming_the_line(client: Any) -> None:
    good = json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": chat()}).encode()
    huge = json.dumps({"custom_id": "b", "method": "POST", "url": CHAT,
                       "body": chat(pad=[0] * 600_000)}).encode()
    upload = (io.BytesIO(good + b"\n" + huge + b"\n"), "in.jsonl")
    resp = client.post("/v1/files", headers=AUTH, content_type="multipart/form-data",
                       data={"purpose": "batch", "file": upload})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_file"
    assert error["message"].startswith("line 2: the JSON holds more than 500000 values"), error


# --- under gunicorn --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(redis_url: str, scripted_worker: Process, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[Process, str]]:
    tmp: Path = tmp_path_factory.mktemp("validation")
    proc, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL, FILES_DIR=str(tmp / "files"),
                           IP_RATE_LIMIT="100000/minute")
    yield proc, base
    proc.stop()


def _worker_process(master: Process) -> psutil.Process:
    (worker,) = psutil.Process(master.proc.pid).children()
    return worker


def test_fifteen_hostile_bodies_at_once_leave_the_worker_serving(api: tuple[Process, str]) -> None:
    """15 bodies of 2 million values sent at once, a normal chat request sent among them: the
    same gunicorn worker answers every one, the chat within seconds, without swelling."""
    proc, base = api
    worker = _worker_process(proc)
    rss_before = worker.memory_info().rss
    peak_rss = rss_before
    with httpx.Client(base_url=base, timeout=120) as http:
        assert http.post(CHAT, json=chat(), headers=AUTH).status_code == 200  # warm

        def hostile(_: int) -> httpx.Response:
            return http.post(CHAT, content=ZEROS_4MIB, headers=JSON_AUTH)

        def normal() -> tuple[httpx.Response, float]:
            time.sleep(0.3)  # once the hostile bodies are on their way
            started = time.monotonic()
            return http.post(CHAT, json=chat(), headers=AUTH), time.monotonic() - started

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            hostile_resps = pool.map(hostile, range(15))
            normal_future = pool.submit(normal)
            while not normal_future.done():
                peak_rss = max(peak_rss, worker.memory_info().rss)
                time.sleep(0.05)
            answers = list(hostile_resps)
        took = time.monotonic() - started
        normal_resp, normal_took = normal_future.result()
    assert [r.status_code for r in answers] == [400] * 15
    assert all("MAX_JSON_ELEMENTS" in r.json()["error"]["message"] for r in answers)
    assert normal_resp.status_code == 200, normal_resp.text
    assert normal_resp.json()["choices"][0]["message"]["content"] == "tok0 tok1"
    assert normal_took < 5, normal_took
    assert took < 15, took
    assert _worker_process(proc).pid == worker.pid  # never killed nor replaced
    assert peak_rss - rss_before < 400 * MiB, (peak_rss - rss_before) / MiB


def test_the_validation_benchmark_runs() -> None:
    """``python -m benchmarks.validation_cost`` (docs/benchmarks.md) at a tiny size: every hostile
    shape over the caps is refused, every body under them admitted."""
    argv = [sys.executable, "-m", "benchmarks.validation_cost", "--mib", "0.1", "--line-mib", "0.1",
            "--repeat", "1"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.splitlines()[-1])["rows"]
    outcomes = {(row["what"], row["shape"]): row["outcome"] for row in rows}
    assert outcomes[("chat", "nested [[[...]]]")].startswith("400: the JSON nests deeper")
    assert all(outcomes[(what, shape)] in ("admitted", "accepted") for what in ("chat cap", "line cap")
               for shape in ("[0,0,...]", "[[],[],...]", '["a","a",...]'))
