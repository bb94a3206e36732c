"""Quick benchmark: the same workload through the whole stack vs the engine driven directly.

In one run on one machine it hosts the engine in this process (the baseline: the same
engine class the worker hosts, built by :func:`workers.runtime.build_engine` from the same
settings) and starts a worker plus the API as child processes on a private
``redis-server`` and a private temporary database, then alternates the two (direct,
stack, direct, stack ...) for ``--pairs`` pairs with the same requests: concurrency C
streaming requests, each with a fixed prompt and ``max_tokens``. Both get the same
warm-up first. It prints each pair's output tokens/s and TTFT p50, and the median and
spread (min..max) of each figure and of the stack/direct ratios; the last line of output
is the result as JSON.

    python -m benchmarks.stack_vs_engine --concurrency 16 --requests 32 --pairs 3
    python -m benchmarks.stack_vs_engine --env ENGINE=scripted --env SERVED_MODEL_NAME=scripted-bench

``--env NAME=VALUE`` settings reach both sides: this process's engine and the worker.
"""

from __future__ import annotations

import json
import os
import shutil
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

from benchmarks.stack import BENCH_KEY, private_stack
from benchmarks.vs_vllm import settings_for
from config import Settings, get_settings
from queueing import events
from queueing.jobs import COMPLETIONS, JobRequest
from workers.engine import Engine, server_argv

console = Console(width=max(shutil.get_terminal_size().columns, 150))


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

        def emit(ev: events.Delta) -> None:
            nonlocal tokens, ttft
            tokens += ev.tokens
            if ev.tokens and not ttft:
                ttft = time.perf_counter() - start

        for ev in engine.stream(f"direct-{time.time_ns()}-{i}", request, emit):
            if isinstance(ev, events.Delta):
                emit(ev)
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


PAIR_FIGURES = ("direct_tok_s", "stack_tok_s", "ratio_tok_s", "direct_ttft_p50_ms", "stack_ttft_p50_ms",
                "added_ttft_p50_ms")


def pair_figures(d: RunResult, st: RunResult) -> dict[str, float]:
    return {"direct_tok_s": d.tokens_per_s, "stack_tok_s": st.tokens_per_s,
            "ratio_tok_s": st.tokens_per_s / d.tokens_per_s,
            "direct_ttft_p50_ms": d.ttft_p50 * 1000, "stack_ttft_p50_ms": st.ttft_p50 * 1000,
            "added_ttft_p50_ms": (st.ttft_p50 - d.ttft_p50) * 1000}


def spread(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per figure: median, min and max over the pairs."""
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k in PAIR_FIGURES for v in [[row[k] for row in rows]]}


def results_table(rows: list[dict[str, float]], stats: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    for col in ("pair", *PAIR_FIGURES):
        table.add_column(col.replace("_", " "), justify="right")

    def fmt(key: str, value: float) -> str:
        return f"{value:.3f}" if key.startswith("ratio") else f"{value:+.0f}" if key.startswith("added") \
            else f"{value:.1f}" if key.endswith("tok_s") else f"{value:.0f}"

    for i, row in enumerate(rows, 1):
        table.add_row(str(i), *(fmt(k, row[k]) for k in PAIR_FIGURES))
    table.add_row("median", *(fmt(k, stats[k]["median"]) for k in PAIR_FIGURES), end_section=True)
    table.add_row("spread", *(f"{fmt(k, stats[k]['min'])}..{fmt(k, stats[k]['max'])}" for k in PAIR_FIGURES))
    return table


def check_engine_arguments(s: Settings, worker_env: dict[str, str]) -> list[str]:
    """Print the engine arguments of both sides (vLLM's command line, from this process's settings and
    from those of the worker's environment as it was started); raise if they differ."""
    if s.engine != "vllm":
        console.print(f"engine: {s.engine} (a test double, on both sides: no engine arguments)")
        return []
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    baseline, worker = server_argv(s, on_cpu), server_argv(settings_for(worker_env), on_cpu)
    console.print("[bold]engine arguments[/] (from each side's settings): "
                  f"{'identical' if baseline == worker else '[red]DIFFERENT[/]'}")
    console.print(f"  in-process engine: {' '.join(baseline)}")
    console.print(f"  worker:            {' '.join(worker)}")
    if baseline != worker:
        raise click.ClickException("the two sides would not run the same engine (see above)")
    return baseline


@click.command()
@click.option("--concurrency", default=16, show_default=True)
@click.option("--requests", "n_requests", default=32, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--pairs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Alternating direct/stack run pairs (3 or more for a figure worth quoting).")
@click.option("--warmup-tokens", default=8, show_default=True,
              help="max_tokens of the warm-up (one round of `concurrency` requests, both sides).")
@click.option("--port", type=int, help="Port for the API under test (default: a free one).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME=VALUE",
              help="A setting for both sides (this process's engine and the worker).")
def main(concurrency: int, n_requests: int, max_tokens: int, pairs: int, warmup_tokens: int, port: int | None,
         extra_env: tuple[str, ...]) -> None:
    """Output tokens/s and TTFT: inferq (API + Celery + worker) vs the same engine in-process."""
    from workers.runtime import build_engine

    overrides = dict(item.split("=", 1) for item in extra_env)
    os.environ.update(overrides)  # this process's engine reads the same settings as the worker
    get_settings.cache_clear()
    s = get_settings()
    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or str(s.kv_cache_space_gib)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv  # one value for both engines
    console.print(f"[bold]starting the baseline engine in-process, then a worker + API on a private Redis "
                  f"({s.engine}: {s.model_name if s.engine == 'vllm' else s.served_model_name})[/]")
    engine = build_engine(s)
    rows: list[dict[str, float]] = []
    try:
        with private_stack(port, 600, env={**overrides, "VLLM_CPU_KVCACHE_SPACE": kv}) as stack:
            engine_argv = check_engine_arguments(s, stack.env)
            base, model = stack.base, s.served_model_name
            texts = prompts(n_requests)
            console.print("warm-up (both sides)")
            run_direct(engine, model, texts[:concurrency], warmup_tokens, concurrency)
            run_stack(base, model, texts[:concurrency], warmup_tokens, concurrency)
            for pair in range(1, pairs + 1):
                d = run_direct(engine, model, texts, max_tokens, concurrency)
                st = run_stack(base, model, texts, max_tokens, concurrency)
                rows.append(row := pair_figures(d, st))
                console.print(f"pair {pair}: direct {row['direct_tok_s']:.1f} tok/s, stack "
                              f"{row['stack_tok_s']:.1f} tok/s, ratio {row['ratio_tok_s']:.3f}, "
                              f"TTFT p50 added {row['added_ttft_p50_ms']:+.0f} ms; "
                              f"load {os.getloadavg()[0]:.2f}")
    finally:
        engine.shutdown()
    stats = spread(rows)
    console.print(results_table(rows, stats, f"{n_requests} requests x {max_tokens} tokens, concurrency "
                                             f"{concurrency}, stack / direct"))
    print(json.dumps({"settings": {"concurrency": concurrency, "requests": n_requests,
                                   "max_tokens": max_tokens, "pairs": pairs, "engine": s.engine,
                                   "model": s.served_model_name,
                                   "env": overrides, "VLLM_CPU_KVCACHE_SPACE": kv,
                                   "engine_argv": engine_argv},
                      "pairs": rows, "stats": stats}), flush=True)


if __name__ == "__main__":
    main()
