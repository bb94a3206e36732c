"""The async load driver: sends requests to an OpenAI-compatible server and measures each one.

Closed loop (``rate`` unset): ``concurrency`` tasks each send a request as soon as
their previous one ended. Open loop (``rate`` set): requests arrive as a Poisson
process at ``rate`` per second, whatever the server's pace; at most ``concurrency``
are in flight, later arrivals wait (their wait is recorded as ``queued``, not in
the latency). Requests sent during the warm-up are measured but flagged, and left
out of every figure. Batch mode uploads a JSONL file, creates a batch and polls it.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from loadtest.workload import RequestSpec, Workload

Mode = Literal["chat-stream", "chat", "completions", "batch"]
MODES: tuple[Mode, ...] = ("chat-stream", "chat", "completions", "batch")
BATCH_DONE = ("completed", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class DriverConfig:
    """Where and how to send: one run's fixed settings."""

    base_url: str
    api_key: str
    model: str
    mode: Mode = "chat-stream"
    stream: bool = True
    concurrency: int = 16
    rate: float | None = None
    duration: float | None = None
    requests: int | None = None
    warmup: float = 0.0
    ignore_eos: bool = False
    temperature: float | None = None
    timeout: float = 600.0
    seed: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class RequestResult:
    """One request, measured by the client. Times in seconds; ``start`` is since the run began."""

    start: float
    latency: float
    ttft: float | None
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int
    error: str | None = None
    warmup: bool = False
    queued: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def itl(self) -> float | None:
        """Mean inter-token latency: the time after the first token over the tokens after it."""
        if self.ttft is None or self.completion_tokens < 2 or self.error is not None:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


@dataclass
class RunState:
    """A run in progress: what the live display reads, and what the report is built from."""

    warmup: float = 0.0
    duration: float | None = None
    requests: int | None = None
    started: float = field(default_factory=time.perf_counter)
    results: list[RequestResult] = field(default_factory=list)
    in_flight: int = 0
    sent: int = 0
    measured_sent: int = 0
    finished: float | None = None

    @property
    def measure_start(self) -> float:
        return self.started + self.warmup

    def is_open(self, now: float) -> bool:
        """True while new requests may start (the duration and request count are not reached)."""
        if self.duration is not None and now >= self.measure_start + self.duration:
            return False
        return self.requests is None or self.measured_sent < self.requests

    def claim(self, now: float) -> bool | None:
        """Start another request now? None: no more; else whether it is a warm-up request."""
        if now < self.measure_start:
            self.sent += 1
            return True
        if not self.is_open(now):
            return None
        self.sent += 1
        self.measured_sent += 1
        return False

    def measured(self) -> list[RequestResult]:
        """Finished requests that count (not warm-up)."""
        return [r for r in self.results if not r.warmup]


def request_body(config: DriverConfig, spec: RequestSpec) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body for one request."""
    body: dict[str, Any] = {"model": config.model, "max_tokens": spec.max_tokens}
    if config.mode == "completions":
        path, body["prompt"] = "/completions", spec.as_prompt()
    else:
        path, body["messages"] = "/chat/completions", spec.as_messages()
    if config.stream and config.mode != "batch":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.temperature is not None:
        body["temperature"] = config.temperature
    return path, body


def error_label(payload: Any) -> str | None:
    """The OpenAI error code of an ``{"error": ...}`` body, else its type (vLLM's codes are numbers)."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    label = code if isinstance(code, str) and code else err.get("type")
    return str(label) if label else None


def error_kind(status: int, payload: Any) -> str:
    """``"<status> <code>"``, e.g. ``"401 invalid_api_key"``; the bare status without an error body."""
    label = error_label(payload)
    return f"{status} {label}" if label else str(status)


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    first = choices[0]
    if "delta" in first:
        return str((first["delta"] or {}).get("content") or "")
    return str(first.get("text") or "")


def _usage(payload: dict[str, Any]) -> tuple[int, int] | None:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def send_one(client: httpx.AsyncClient, config: DriverConfig, spec: RequestSpec,
                   started: float) -> RequestResult:
    """Send one request and measure it; failures are recorded in ``error``, never raised."""
    path, body = request_body(config, spec)
    url = config.base_url + path
    t0 = time.perf_counter()
    read = _Reading(t0)
    try:
        if config.stream:
            async with client.stream("POST", url, json=body, headers=config.headers) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    read.error = error_kind(resp.status_code, _json_or_none(resp))
                else:
                    await read.stream(resp)
        else:
            resp = await client.post(url, json=body, headers=config.headers)
            payload = _json_or_none(resp)
            if resp.status_code >= 400:
                read.error = error_kind(resp.status_code, payload)
            else:
                read.usage = _usage(payload or {})
    except httpx.HTTPError as exc:
        read.error = type(exc).__name__
    except ValueError:  # a body that is not the JSON it should be
        read.error = "invalid_response"
    latency = time.perf_counter() - t0
    prompt_tokens, completion_tokens = read.usage if read.usage is not None else (0, read.chunks)
    return RequestResult(start=t0 - started, latency=latency, ttft=read.ttft, prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens, max_tokens=spec.max_tokens, error=read.error)


@dataclass
class _Reading:
    """What one response told so far."""

    t0: float
    ttft: float | None = None
    usage: tuple[int, int] | None = None
    chunks: int = 0
    error: str | None = None

    async def stream(self, resp: httpx.Response) -> None:
        """Read SSE ``data:`` frames up to ``[DONE]``: first content time, content chunks, usage, errors."""
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                self.error = f"stream {error_label(chunk) or 'error'}"
                return
            self.usage = _usage(chunk) or self.usage
            if _chunk_text(chunk):
                self.chunks += 1
                if self.ttft is None:
                    self.ttft = time.perf_counter() - self.t0
        self.error = "incomplete_stream"  # ended without [DONE]


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def make_client(config: DriverConfig) -> httpx.AsyncClient:
    """An HTTP client sized for the run's concurrency."""
    n = config.concurrency
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n)
    return httpx.AsyncClient(timeout=httpx.Timeout(config.timeout, connect=30), limits=limits)


async def run(config: DriverConfig, workload: Workload, state: RunState) -> None:
    """Drive the load until the duration or request count is reached; results go into ``state``."""
    state.started = time.perf_counter()
    async with make_client(config) as client:
        slots = asyncio.Semaphore(config.concurrency)

        async def one(spec: RequestSpec, warmup: bool, arrived: float) -> None:
            async with slots:
                queued = time.perf_counter() - arrived
                state.in_flight += 1
                try:
                    result = await send_one(client, config, spec, state.started)
                finally:
                    state.in_flight -= 1
            result.warmup, result.queued = warmup, queued
            state.results.append(result)

        if config.rate is None:
            await _closed_loop(config, workload, state, one)
        else:
            await _open_loop(config, workload, state, one)
    state.finished = time.perf_counter()


OneRequest = Callable[[RequestSpec, bool, float], Coroutine[Any, Any, None]]


async def _closed_loop(config: DriverConfig, workload: Workload, state: RunState, one: OneRequest) -> None:
    async def user() -> None:
        while (warmup := state.claim(time.perf_counter())) is not None:
            await one(workload.next(), warmup, time.perf_counter())

    await asyncio.gather(*(user() for _ in range(config.concurrency)))


async def _open_loop(config: DriverConfig, workload: Workload, state: RunState, one: OneRequest) -> None:
    assert config.rate is not None
    rng = random.Random(config.seed)
    tasks: set[asyncio.Task[None]] = set()
    arrival = time.perf_counter()
    while True:
        await asyncio.sleep(max(0.0, arrival - time.perf_counter()))
        warmup = state.claim(arrival)
        if warmup is None:
            break
        task = asyncio.create_task(one(workload.next(), warmup, arrival))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        arrival += rng.expovariate(config.rate)
    await asyncio.gather(*tasks)


class BatchError(RuntimeError):
    """The batch could not be created or did not end in time."""


@dataclass
class BatchProgress:
    """A batch job being polled: its status and OpenAI ``request_counts``."""

    lines: int
    started: float = field(default_factory=time.perf_counter)
    batch_id: str = ""
    status: str = "uploading"
    counts: dict[str, int] = field(default_factory=dict)
    finished: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.perf_counter()) - self.started


def batch_input(config: DriverConfig, workload: Workload, lines: int) -> bytes:
    """The batch input file: ``lines`` chat completion requests, one JSON object per line."""
    out = []
    for i in range(lines):
        path, body = request_body(config, workload.next())
        out.append(json.dumps({"custom_id": f"loadtest-{i}", "method": "POST", "url": "/v1" + path,
                               "body": body}))
    return ("\n".join(out) + "\n").encode()


async def run_batch(config: DriverConfig, workload: Workload, progress: BatchProgress,
                    poll_interval: float = 0.5) -> None:
    """Upload the input file, create the batch, poll it until it ends, then tally its output files."""
    data = batch_input(config, workload, progress.lines)
    async with make_client(config) as client:
        async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            resp = await client.request(method, config.base_url + path, headers=config.headers, **kwargs)
            if resp.status_code >= 400:
                raise BatchError(f"{method} {path}: {error_kind(resp.status_code, _json_or_none(resp))}")
            return resp

        upload = {"file": ("loadtest.jsonl", io.BytesIO(data), "application/jsonl")}
        uploaded = (await call("POST", "/files", data={"purpose": "batch"}, files=upload)).json()
        progress.started = time.perf_counter()  # the batch's time runs from its creation
        batch = (await call("POST", "/batches", json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
        })).json()
        progress.batch_id = batch["id"]
        deadline = time.perf_counter() + config.timeout
        while batch["status"] not in BATCH_DONE:
            if time.perf_counter() > deadline:
                raise BatchError(f"batch {batch['id']} still {batch['status']} after {config.timeout:.0f}s")
            progress.status, progress.counts = batch["status"], batch.get("request_counts") or {}
            await asyncio.sleep(poll_interval)
            batch = (await call("GET", f"/batches/{batch['id']}")).json()
        progress.finished = time.perf_counter()
        progress.status, progress.counts = batch["status"], batch.get("request_counts") or {}
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                _tally_output((await call("GET", f"/files/{batch[key]}/content")).text, progress)


def _tally_output(text: str, progress: BatchProgress) -> None:
    for raw in text.splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        response = line.get("response") or {}
        status, body = int(response.get("status_code") or 0), response.get("body") or {}
        if status == 200 and not line.get("error"):
            prompt_tokens, completion_tokens = _usage(body) or (0, 0)
            progress.prompt_tokens += prompt_tokens
            progress.completion_tokens += completion_tokens
        else:
            kind = error_kind(status, body if "error" in body else {"error": line.get("error")})
            progress.errors[kind] = progress.errors.get(kind, 0) + 1
