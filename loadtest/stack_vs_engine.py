"""Quick benchmark: the same workload through the whole stack vs the engine driven directly.

In one run on one machine it hosts a vLLM engine in this process (the baseline)
and starts a worker (same model and engine settings) plus the API as child
processes, then alternates the two, several pairs, with the same requests:
concurrency C streaming requests, each with a fixed prompt and ``max_tokens``.
It prints output tokens/s, TTFT p50 and their stack/direct ratios.

    python -m loadtest.stack_vs_engine --concurrency 16 --requests 32 --pairs 3

Needs Redis at REDIS_URL (``make run`` starts one; or ``redis-server``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from config import get_settings
from loadtest.stack import BENCH_KEY, running_stack
from queueing import events
from queueing.jobs import COMPLETIONS, JobRequest
from workers.engine import Engine

console = Console()


@dataclass
class RunResult:
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts)


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a short story about a lighthouse keeper named Ada." for i in range(n)]


def request_body(model: str, text: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """One streaming completions request, as the stack's client sends it and the direct run too."""
    return {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def run_direct(engine: Engine, model: str, texts: list[str], max_tokens: int, concurrency: int) -> RunResult:
    """The baseline: the same engine class the worker hosts, driven from threads with the job requests
    the worker gets; tokens are counted from the deltas, TTFT is the first delta carrying tokens."""

    def one(i: int, text: str) -> tuple[int, float]:
        request = JobRequest(endpoint=COMPLETIONS, model=model, body=request_body(model, text, max_tokens, i))
        start, ttft, tokens = time.perf_counter(), 0.0, 0
        for ev in engine.stream(f"direct-{time.time_ns()}-{i}", request):
            if isinstance(ev, events.Delta):
                tokens += ev.tokens
                if ev.tokens and not ttft:
                    ttft = time.perf_counter() - start
            elif not isinstance(ev, events.Done):
                raise RuntimeError(f"direct request {i} did not finish: {ev}")
        return tokens, ttft

    return _timed(one, texts, concurrency)


def run_stack(base: str, model: str, texts: list[str], max_tokens: int, concurrency: int) -> RunResult:
    """The same requests as streaming HTTP calls through API -> Celery -> worker -> SSE."""
    import json

    client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=concurrency * 2))

    def one(i: int, text: str) -> tuple[int, float]:
        body = request_body(model, text, max_tokens, i)
        start, ttft, tokens = time.perf_counter(), 0.0, 0
        with client.stream("POST", f"{base}/v1/completions", json=body,
                           headers={"Authorization": f"Bearer {BENCH_KEY}"}) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"] and not ttft:
                    ttft = time.perf_counter() - start
        return tokens, ttft

    try:
        return _timed(one, texts, concurrency)
    finally:
        client.close()


def _timed(one: Callable[[int, str], tuple[int, float]], texts: list[str], concurrency: int) -> RunResult:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(texts)), texts))
    return RunResult(sum(r[0] for r in results), time.perf_counter() - start, [r[1] for r in results])


@click.command()
@click.option("--concurrency", default=16, show_default=True)
@click.option("--requests", "n_requests", default=32, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--pairs", default=3, show_default=True, help="Alternating direct/stack run pairs.")
@click.option("--port", default=8077, show_default=True, help="Port for the API under test.")
def main(concurrency: int, n_requests: int, max_tokens: int, pairs: int, port: int) -> None:
    """Output tokens/s and TTFT: inferq (API + Celery + worker) vs the same vLLM engine in-process."""
    from workers.vllm_engine import VllmEngine

    s = get_settings()
    console.print(f"[bold]starting the baseline engine in-process, then a worker + API ({s.model_name})[/]")
    engine = VllmEngine(s)
    try:
        with running_stack(port) as base:
            texts = prompts(n_requests)
            console.print("warm-up")
            run_direct(engine, s.served_model_name, texts[:concurrency], 8, concurrency)
            run_stack(base, s.served_model_name, texts[:concurrency], 8, concurrency)
            table = Table(title=f"{n_requests} requests x {max_tokens} tokens, concurrency {concurrency}")
            for col in ("pair", "direct tok/s", "stack tok/s", "ratio", "direct TTFT p50", "stack TTFT p50",
                        "TTFT added"):
                table.add_column(col, justify="right")
            ratios, added = [], []
            for pair in range(1, pairs + 1):
                d = run_direct(engine, s.served_model_name, texts, max_tokens, concurrency)
                st = run_stack(base, s.served_model_name, texts, max_tokens, concurrency)
                ratios.append(st.tokens_per_s / d.tokens_per_s)
                added.append(st.ttft_p50 - d.ttft_p50)
                table.add_row(str(pair), f"{d.tokens_per_s:.1f}", f"{st.tokens_per_s:.1f}",
                              f"{ratios[-1]:.3f}", f"{d.ttft_p50 * 1000:.0f} ms",
                              f"{st.ttft_p50 * 1000:.0f} ms", f"{added[-1] * 1000:+.0f} ms")
                console.print(f"pair {pair}: ratio {ratios[-1]:.3f}")
            table.add_row("median", "", "", f"{statistics.median(ratios):.3f}", "", "",
                          f"{statistics.median(added) * 1000:+.0f} ms")
            console.print(table)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
