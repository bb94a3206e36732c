"""The token path at a GPU's pace: what the worker, Redis and the API spend per streamed token.

    python -m benchmarks.token_path --streams 256 --step 0.025 --tokens 256 --pairs 3

The engine is the paced test double (``ENGINE=paced``): one step thread advances
every running stream by one token per ``--step``, as a GPU engine does, so
``--streams`` streams emit about streams / step tokens per second (256 at 25 ms:
about 10,000/s). A private Redis, one worker process and the API (``--api-workers``
processes) run it; a lean asyncio client keeps ``--streams`` chat streams open
(each of ``--tokens`` tokens, the next one sent as one ends) and times every
token's arrival.

Alternating with the stack, in the same run, the same engine is driven directly in
this process at the same concurrency (A B A B ..., ``--pairs`` pairs, each after a
warm-up): what the stack adds to time to first token and to inter-token latency is
stack minus engine. Per window it prints the tokens the engine emitted and the
client received, CPU microseconds per delivered token for the worker, the API and
Redis, and TTFT and ITL percentiles; then the median and spread over the pairs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from benchmarks.proc_cpu import ProcessGroups
from benchmarks.stack import BENCH_KEY, running_stack
from inferq.launcher import free_port, redis_server
from loadtest.stats import Summary, summarize

console = Console()
MODEL = "paced-gpu"
OUT_DIR = Path(__file__).with_name("out")
ROLES = ("worker", "api", "coordinator", "redis-server", "client")
_EMITTED = re.compile(rb"^inferq_paced_engine_tokens_total ([0-9.e+]+)$", re.M)


@dataclass
class Window:
    """What one measured window saw (times in seconds)."""

    side: str
    seconds: float
    emitted: int
    delivered: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    errors: int = 0

    def summary(self, what: str) -> Summary:
        values = summarize(getattr(self, what))
        if values is None:
            raise RuntimeError(f"{self.side}: no {what} measured (errors: {self.errors})")
        return values

    def us_per_token(self, role: str) -> float:
        return self.cpu.get(role, 0.0) * 1e6 / max(self.delivered, 1)


class _Recorder:
    """Token arrivals of the streams while a window is open."""

    def __init__(self) -> None:
        self.open = False
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tokens = 0
        self.errors = 0

    def start(self) -> None:
        self.ttft, self.itl, self.tokens, self.errors, self.open = [], [], 0, 0, True


# --- the stack: a lean HTTP client --------------------------------------------


async def _stream_once(port: int, body: bytes, rec: _Recorder) -> None:
    """One chat stream over a fresh connection; counts tokens as the ``tok`` words arrive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {BENCH_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    sent = time.perf_counter()
    writer.write(head.encode() + body)
    try:
        header = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in header.split(b"\r\n", 1)[0]:
            rec.errors += rec.open
            return
        last, tail = 0.0, b""
        while data := await reader.read(65536):
            now = time.perf_counter()
            count = (tail + data).count(b"tok")
            tail = data[-2:]
            if not count:
                continue
            if rec.open:  # tokens that arrive together: one gap, then zeros
                rec.tokens += count
                (rec.itl if last else rec.ttft).append(now - (last or sent))
                rec.itl.extend([0.0] * (count - 1))
            last = now
    finally:
        writer.close()


async def _streams(port: int, streams: int, tokens: int, step: float, rec: _Recorder,
                   stop: asyncio.Event) -> None:
    async def user(i: int) -> None:
        await asyncio.sleep(stagger(i, streams, tokens, step))
        n = 0
        while not stop.is_set():
            body = json.dumps({"model": MODEL, "stream": True, "max_tokens": tokens,
                               "messages": [{"role": "user", "content": f"stream {i}.{n} of the benchmark"}]})
            n += 1
            try:
                await _stream_once(port, body.encode(), rec)
            except (OSError, asyncio.IncompleteReadError):
                rec.errors += rec.open
                await asyncio.sleep(0.1)

    await asyncio.gather(*(user(i) for i in range(streams)))


def stagger(i: int, streams: int, tokens: int, step: float) -> float:
    """When stream ``i`` starts: starts spread evenly over one stream's length, as requests arrive
    at a busy server (not all at once, which would measure a burst of ``streams`` requests)."""
    return i / streams * tokens * step


def _emitted(metrics_url: str) -> int:
    match = _EMITTED.search(httpx.get(metrics_url, timeout=10).content)
    return int(float(match.group(1))) if match else 0


class StackSide:
    """The stack under load for the whole run; windows are measured while it streams."""

    def __init__(self, port: int, metrics_url: str, cpu: ProcessGroups, streams: int, tokens: int,
                 step: float):
        self.port, self.metrics_url, self.cpu = port, metrics_url, cpu
        self.streams, self.tokens, self.step = streams, tokens, step
        self.rec = _Recorder()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            await _streams(self.port, self.streams, self.tokens, self.step, self.rec, self._stop)

        self._loop.run_until_complete(main())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    def window(self, seconds: float) -> Window:
        """Measure ``seconds`` of the running load."""
        emitted0, cpu0 = _emitted(self.metrics_url), self.cpu.cpu_seconds()
        self._loop.call_soon_threadsafe(self.rec.start)
        time.sleep(seconds)
        self.rec.open = False
        emitted, cpu = _emitted(self.metrics_url) - emitted0, self.cpu.cpu_seconds()
        rec = self.rec
        return Window("stack", seconds, emitted, rec.tokens, list(rec.ttft), list(rec.itl),
                      {role: cpu.get(role, 0.0) - cpu0.get(role, 0.0) for role in cpu}, rec.errors)


# --- the baseline: the same engine, driven directly ---------------------------


def engine_window(step: float, streams: int, tokens: int, warmup: float, seconds: float) -> Window:
    """The paced engine alone: ``streams`` streams kept running from threads; TTFT from the call to the
    first token, ITL between a stream's tokens, as the engine's step thread emitted them."""
    from queueing import events
    from queueing.jobs import CHAT, JobRequest
    from workers.paced_engine import PacedEngine

    engine = PacedEngine(step=step, model=MODEL)
    rec = _Recorder()
    stop = threading.Event()

    def user(i: int) -> None:
        if stop.wait(stagger(i, streams, tokens, step)):
            return
        n = 0
        while not stop.is_set():
            body = {"model": MODEL, "stream": True, "max_tokens": tokens,
                    "messages": [{"role": "user", "content": f"stream {i}.{n} of the benchmark"}]}
            n += 1
            times = [time.perf_counter()]  # sent, then each token's arrival

            def emit(delta: events.Delta, times: list[float] = times) -> None:
                now = time.perf_counter()
                if rec.open and delta.tokens:
                    rec.tokens += delta.tokens
                    (rec.itl if len(times) > 1 else rec.ttft).append(now - times[-1])
                times.append(now)

            for _ in engine.stream(f"direct-{i}-{n}", JobRequest(CHAT, MODEL, body), emit):
                pass

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    emitted0 = engine.tokens
    rec.start()
    time.sleep(seconds)
    rec.open = False
    emitted = engine.tokens - emitted0
    stop.set()
    for t in threads:
        t.join(timeout=60)
    engine.shutdown()
    return Window("engine", seconds, emitted, rec.tokens, list(rec.ttft), list(rec.itl), {}, rec.errors)


# --- the run ------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def pair_row(engine: Window, stack: Window) -> dict[str, float]:
    """The figures of one (engine, stack) pair."""
    e_ttft, s_ttft, e_itl, s_itl = (engine.summary("ttft"), stack.summary("ttft"), engine.summary("itl"),
                                    stack.summary("itl"))
    return {
        "engine_tokens_per_s": engine.emitted / engine.seconds,
        "stack_emitted_per_s": stack.emitted / stack.seconds,
        "stack_delivered_per_s": stack.delivered / stack.seconds,
        "delivered_over_emitted": stack.delivered / max(stack.emitted, 1),
        "added_ttft_p50_ms": (s_ttft.p50 - e_ttft.p50) * 1000,
        "added_itl_p99_ms": (s_itl.p99 - e_itl.p99) * 1000,
        "stack_ttft_p50_ms": s_ttft.p50 * 1000, "engine_ttft_p50_ms": e_ttft.p50 * 1000,
        "stack_itl_p50_ms": s_itl.p50 * 1000, "stack_itl_p99_ms": s_itl.p99 * 1000,
        "engine_itl_p99_ms": e_itl.p99 * 1000,
        **{f"{role}_us_per_token": stack.us_per_token(role) for role in ROLES},
        "errors": stack.errors,
    }


COLUMNS = ("engine_tokens_per_s", "stack_emitted_per_s", "stack_delivered_per_s", "delivered_over_emitted",
           "added_ttft_p50_ms", "added_itl_p99_ms", "worker_us_per_token", "api_us_per_token",
           "coordinator_us_per_token",
           "redis-server_us_per_token", "client_us_per_token", "errors")


def print_pairs(rows: list[dict[str, float]], settings: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One line per figure: each pair, then the median and the spread (min..max)."""
    table = Table(title=f"Token path at a GPU's pace: {settings['streams']} streams x 1 token per "
                        f"{settings['step'] * 1000:.0f} ms, {settings['tokens']} tokens each, "
                        f"{settings['api_workers']} API process(es), one worker")
    table.add_column("figure")
    for i in range(len(rows)):
        table.add_column(f"pair {i + 1}", justify="right")
    table.add_column("median", justify="right")
    table.add_column("spread", justify="right")
    stats = {}
    for c in COLUMNS:
        values = [row[c] for row in rows]
        stats[c] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        fmt = "{:.3f}" if c == "delivered_over_emitted" else "{:.1f}"
        table.add_row(c.replace("_", " "), *(fmt.format(v) for v in values), fmt.format(stats[c]["median"]),
                      f"{fmt.format(stats[c]['min'])}..{fmt.format(stats[c]['max'])}")
    console.print(table)
    console.print("added = stack - engine alone (same engine driven in this process, alternated with the "
                  "stack); us per token = CPU microseconds per delivered token.")
    return stats


@click.command()
@click.option("--streams", default=256, show_default=True, help="Concurrent streams (kept open).")
@click.option("--step", default=0.025, show_default=True, help="Engine step (s): a token per stream.")
@click.option("--tokens", default=256, show_default=True, help="Tokens per stream.")
@click.option("--pairs", default=3, show_default=True, help="Engine-alone / stack pairs, alternated.")
@click.option("--seconds", default=15.0, show_default=True, help="Measured seconds per window.")
@click.option("--warmup", default=8.0, show_default=True,
              help="Seconds of load before each window (at least one stream's length).")
@click.option("--api-workers", default=1, show_default=True, help="API processes.")
@click.option("--env", "extra_env", multiple=True, metavar="NAME=VALUE", help="A setting for worker and API.")
def main(streams: int, step: float, tokens: int, pairs: int, seconds: float, warmup: float, api_workers: int,
         extra_env: tuple[str, ...]) -> None:
    """CPU per token of worker, API and Redis, delivered/emitted, and TTFT/ITL added, at a GPU's pace."""
    settings = {"streams": streams, "step": step, "tokens": tokens, "pairs": pairs, "seconds": seconds,
                "warmup": warmup, "api_workers": api_workers, "env": list(extra_env)}
    overrides = dict(item.split("=", 1) for item in extra_env)
    warmup = max(warmup, tokens * step + 1)  # every stream has started (they start staggered)
    metrics_port, port = free_port(), free_port()
    rows = []
    with tempfile.TemporaryDirectory() as db_dir, redis_server() as private_redis:
        procs: list[Any] = []
        env = {"REDIS_URL": private_redis.url, "DATABASE_URL": f"sqlite:///{db_dir}/token_path.db",
               "ENGINE": "paced",
               "SCRIPTED_TOKEN_DELAY": str(step), "SERVED_MODEL_NAME": MODEL, "MAX_NUM_SEQS": str(streams),
               "MAX_QUEUE_DEPTH": "0", "LOG_LEVEL": "WARNING", "WORKER_METRICS_PORT": str(metrics_port),
               "QUEUE_TIMEOUT": "120", **overrides}
        with running_stack(port, 120, api_args=("--workers", str(api_workers)), procs=procs, **env):
            worker, api, coordinator = procs
            cpu = ProcessGroups({worker.pid: "worker", api.pid: "api", coordinator.pid: "coordinator"})
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            for i in range(pairs):  # the engine alone runs while the stack is idle, and the other way round
                engine = engine_window(step, streams, tokens, warmup, seconds)
                stack = StackSide(port, metrics_url, cpu, streams, tokens, step)
                stack.start()
                time.sleep(warmup)
                try:
                    measured = stack.window(seconds)
                finally:
                    stack.stop()
                rows.append(row := pair_row(engine, measured))
                console.print(f"pair {i + 1}: engine {row['engine_tokens_per_s']:.0f} tok/s; stack "
                              f"emitted {row['stack_emitted_per_s']:.0f}, delivered "
                              f"{row['stack_delivered_per_s']:.0f} ({row['delivered_over_emitted']:.3f}); "
                              f"+TTFT p50 {row['added_ttft_p50_ms']:.1f} ms, "
                              f"+ITL p99 {row['added_itl_p99_ms']:.1f} ms; "
                              f"us/token worker "
                              f"{row['worker_us_per_token']:.1f} API {row['api_us_per_token']:.1f} "
                              f"coordinator {row['coordinator_us_per_token']:.1f} Redis "
                              f"{row['redis-server_us_per_token']:.1f}; errors {row['errors']}")
    stats = print_pairs(rows, settings)
    report = {"settings": settings, "machine": {"nproc": os.cpu_count()}, "pairs": rows, "stats": stats}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "token_path.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
