"""Hold many SSE streams open on one API host and measure its memory per connection.

    python -m benchmarks.sse_hold --connections 1000 --tokens 30 --token-delay 1.0

Starts a private Redis and a private temporary database (the usage ledger goes
there), one worker with the scripted engine (a test double that
emits one token per ``--token-delay`` seconds, so the CPU is not the limit) and
one API process (one gunicorn gevent worker), opens ``--connections`` streaming
chat requests over ``--ramp`` seconds, and reads them all to ``[DONE]``. The
API's memory (gunicorn master and worker, RSS) is sampled idle, then while all
streams are open.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import click
import httpx
import psutil
from rich.console import Console
from rich.table import Table

from benchmarks.stack import BENCH_KEY, private_stack

console = Console()
MODEL = "scripted-hold"


@dataclass
class HoldResult:
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    open_now: int = 0
    peak_open: int = 0


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and its children, in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


async def one_stream(client: httpx.AsyncClient, base: str, tokens: int, delay: float,
                     result: HoldResult) -> None:
    body = {"model": MODEL, "max_tokens": tokens, "stream": True,
            "messages": [{"role": "user", "content": f"[[delay={delay}]] hold"}]}
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                kind = f"{resp.status_code} {resp.json().get('error', {}).get('code')}"
                result.errors[kind] = result.errors.get(kind, 0) + 1
                return
            result.open_now += 1
            result.peak_open = max(result.peak_open, result.open_now)
            last = ""
            try:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        last = line[6:]
            finally:
                result.open_now -= 1
            if last == "[DONE]":
                result.ok += 1
            else:
                code = json.loads(last).get("error", {}).get("code", "?") if last else "empty"
                kind = f"no [DONE]: {code}"
                result.errors[kind] = result.errors.get(kind, 0) + 1
    except httpx.HTTPError as exc:
        kind = type(exc).__name__
        result.errors[kind] = result.errors.get(kind, 0) + 1


async def hold(base: str, api: psutil.Process, connections: int, tokens: int, delay: float,
               ramp: float) -> tuple[HoldResult, list[tuple[float, int, int]]]:
    result = HoldResult()
    samples: list[tuple[float, int, int]] = []
    limits = httpx.Limits(max_connections=connections + 10, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    async with httpx.AsyncClient(limits=limits, headers=headers, timeout=httpx.Timeout(120.0)) as client:
        start = time.monotonic()
        tasks = []
        for i in range(connections):
            tasks.append(asyncio.create_task(one_stream(client, base, tokens, delay, result)))
            await asyncio.sleep(max(0.0, start + ramp * (i + 1) / connections - time.monotonic()))
        while not all(t.done() for t in tasks):
            samples.append((time.monotonic() - start, result.open_now, tree_rss(api)))
            await asyncio.sleep(0.5)
        await asyncio.gather(*tasks)
    return result, samples


@click.command()
@click.option("--connections", default=1000, show_default=True, help="Streams held open at once.")
@click.option("--tokens", default=30, show_default=True, help="Tokens per stream.")
@click.option("--token-delay", default=1.0, show_default=True, help="Seconds between two tokens.")
@click.option("--ramp", default=10.0, show_default=True, help="Seconds over which the streams are opened.")
def main(connections: int, tokens: int, token_delay: float, ramp: float) -> None:
    """Hold CONNECTIONS SSE streams on one API process; report errors and memory per connection."""
    env = {"ENGINE": "scripted", "SERVED_MODEL_NAME": MODEL, "MAX_NUM_SEQS": str(connections),
           "BATCH_SHARE": "0.01", "MAX_QUEUE_DEPTH": "0", "QUEUE_TIMEOUT": "120", "LOG_LEVEL": "WARNING",
           "KEY_MAX_STREAMS": str(connections)}  # the one benchmark key holds every stream
    with private_stack(None, 120, api_args=("--connections", str(connections + 200)), env=env) as stack:
        base = stack.base
        api = psutil.Process(stack.api.pid)
        httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {BENCH_KEY}"})
        idle = tree_rss(api)
        console.print(f"API idle RSS {idle / 2**20:.1f} MiB; opening {connections} streams over {ramp:.0f} s")
        result, samples = asyncio.run(hold(base, api, connections, tokens, token_delay, ramp))
        after = tree_rss(api)
    full = [rss for _, n, rss in samples if n >= connections * 0.99]
    peak_rss = max(rss for _, _, rss in samples)
    table = Table(title=f"{connections} SSE streams on one API process")
    for col in ("streams ok", "errors", "peak open at once", "API RSS idle", "API RSS peak",
                "per connection", "API RSS after"):
        table.add_column(col, justify="right")
    per_conn = (max(full) if full else peak_rss) - idle
    table.add_row(str(result.ok), json.dumps(result.errors) if result.errors else "0", str(result.peak_open),
                  f"{idle / 2**20:.1f} MiB", f"{peak_rss / 2**20:.1f} MiB",
                  f"{per_conn / max(result.peak_open, 1) / 1024:.1f} KiB", f"{after / 2**20:.1f} MiB")
    console.print(table)
    print(json.dumps({"connections": connections, "ok": result.ok, "errors": result.errors,
                      "peak_open": result.peak_open, "api_rss_idle": idle, "api_rss_peak": peak_rss,
                      "api_rss_after": after, "bytes_per_connection": per_conn / max(result.peak_open, 1)}))


if __name__ == "__main__":
    main()
