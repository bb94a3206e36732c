"""Batch benchmark: a batch through /v1/batches vs the same prompts on vLLM offline,
and chat TTFT with and without a batch running.

    python -m loadtest.batch_bench --lines 1000 --max-tokens 32

It starts a worker and the API as child processes (Redis at REDIS_URL), measures
chat TTFT on the idle stack, runs the batch while measuring chat TTFT again,
stops the stack, then runs the same prompts through ``vllm.LLM`` in this process
with the worker's engine arguments (:func:`workers.engine.engine_args`: its dtype
resolution, eager mode and priority scheduling). Needs about two GB of RAM and a few minutes.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import threading
import time

import click
import httpx
from rich.console import Console
from rich.table import Table

from config import get_settings
from loadtest.stack import BENCH_KEY, running_stack
from workers.engine import engine_args

console = Console()


def _prompts(n: int) -> list[str]:
    return [f"Item {i}: describe a city you would like to visit and why." for i in range(n)]


def _ttft(client: httpx.Client, base: str, model: str) -> float:
    body = {"model": model, "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "Say hello to the team."}]}
    start = time.perf_counter()
    with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {BENCH_KEY}"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    return time.perf_counter() - start


def _run_batch(client: httpx.Client, base: str, model: str, prompts: list[str], max_tokens: int,
               during: list[float]) -> tuple[float, int]:
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": p, "max_tokens": max_tokens, "ignore_eos": True}}
             for i, p in enumerate(prompts)]
    data = ("\n".join(json.dumps(line) for line in lines)).encode()
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    file_id = client.post(f"{base}/v1/files", headers=headers, data={"purpose": "batch"},
                          files={"file": ("b.jsonl", io.BytesIO(data))}).json()["id"]
    start = time.perf_counter()
    batch = client.post(f"{base}/v1/batches", headers=headers, json={
        "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}).json()
    probe_started = False
    while batch["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.5)
        batch = client.get(f"{base}/v1/batches/{batch['id']}", headers=headers).json()
        counts = batch["request_counts"]
        if not probe_started and counts["completed"] >= 20:
            probe_started = True
            threading.Thread(target=lambda: during.extend(_ttft(client, base, model) for _ in range(5)),
                             daemon=True).start()
    elapsed = time.perf_counter() - start
    console.print(f"batch {batch['status']}: {batch['request_counts']} in {elapsed:.1f}s")
    return elapsed, int(batch["usage"]["output_tokens"])


def _offline(prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """The same prompts through ``vllm.LLM`` built with exactly the worker's engine arguments."""
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    s = get_settings()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(s.kv_cache_space_gib))  # as the worker does
    if s.vllm_extra_args:
        console.print(f"[yellow]VLLM_EXTRA_ARGS ({s.vllm_extra_args}) reach the worker's engine only, "
                      "not this offline baseline[/]")
    llm = LLM(**engine_args(s, current_platform.is_cpu()))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


@click.command()
@click.option("--lines", default=1000, show_default=True)
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--batch-share", default=1.0, show_default=True,
              help="BATCH_SHARE for the worker (1.0 measures the stack's overhead alone).")
@click.option("--port", default=8079, show_default=True)
def main(lines: int, max_tokens: int, batch_share: float, port: int) -> None:
    """Batch throughput through inferq vs vLLM offline; chat TTFT with and without a batch."""
    s = get_settings()
    prompts, client = _prompts(lines), httpx.Client(timeout=600)
    with running_stack(port, BATCH_SHARE=str(batch_share), FILES_DIR="data/bench-files",
                       DATABASE_URL="sqlite:///data/bench.db") as base:
        idle = [_ttft(client, base, s.served_model_name) for _ in range(6)][1:]
        during: list[float] = []
        batch_s, batch_tokens = _run_batch(client, base, s.served_model_name, prompts, max_tokens, during)
    offline_s, offline_tokens = _offline(prompts, max_tokens)
    table = Table(title=f"{lines} lines x {max_tokens} tokens, BATCH_SHARE={batch_share}")
    for col in ("", "seconds", "output tokens", "tokens/s"):
        table.add_column(col, justify="right")
    table.add_row("vLLM offline (LLM.generate)", f"{offline_s:.1f}", str(offline_tokens),
                  f"{offline_tokens / offline_s:.1f}")
    table.add_row("inferq /v1/batches", f"{batch_s:.1f}", str(batch_tokens), f"{batch_tokens / batch_s:.1f}")
    ratio = (batch_tokens / batch_s) / (offline_tokens / offline_s)
    table.add_row("ratio (inferq / offline)", "", "", f"{ratio:.3f}")
    console.print(table)
    if not during:
        console.print("no TTFT sample during the batch (it ended too soon)")
        return
    console.print(f"chat TTFT p50: idle {statistics.median(idle) * 1000:.0f} ms; during the batch "
                  f"{statistics.median(during) * 1000:.0f} ms (samples: {[round(x * 1000) for x in during]})")


if __name__ == "__main__":
    main()
