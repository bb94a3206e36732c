"""Soak: many short requests through the whole stack, then what they left behind.

    python -m benchmarks.soak --requests 20000 --concurrency 32

Starts a private Redis and a private temporary database (the usage ledger goes
there), one worker with the scripted engine (a test double, so
the stack, not the model, is exercised) and one API process, sends
``--requests`` short chat requests (a third of them streamed, a tenth as
``/v1/jobs``), and reports: errors, the worker's and API's memory over the run,
and every Redis key left without an expiry (job state must all expire).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import click
import httpx
import psutil
import redis
from rich.console import Console
from rich.table import Table

from benchmarks.sse_hold import tree_rss
from benchmarks.stack import BENCH_KEY, private_stack

console = Console()
MODEL = "scripted-soak"
HEADERS = {"Authorization": f"Bearer {BENCH_KEY}"}


async def one(client: httpx.AsyncClient, i: int) -> str | None:
    """Send request ``i``; ``None`` on success, else a short error kind."""
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": f"soak {i}"}]}
    try:
        if i % 10 == 9:
            job = await client.post("/v1/jobs", json={"endpoint": "/v1/chat/completions", "body": body})
            if job.status_code != 202:
                return f"jobs {job.status_code}"
            done = await client.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 30})
            return None if done.json().get("status") == "succeeded" else f"job {done.json().get('status')}"
        if i % 3 == 0:
            async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
                text = (await resp.aread()).decode()
                return None if resp.status_code == 200 and text.endswith("data: [DONE]\n\n") \
                    else f"stream {resp.status_code}"
        resp = await client.post("/v1/chat/completions", json=body)
        return None if resp.status_code == 200 else f"chat {resp.status_code}"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__} ({'job' if i % 10 == 9 else 'stream' if i % 3 == 0 else 'chat'})"


async def drive(base: str, n: int, concurrency: int, on_progress) -> Counter[str]:  # type: ignore[no-untyped-def]
    errors: Counter[str] = Counter()
    counter = iter(range(n))
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=HEADERS, limits=limits, timeout=60) as client:
        async def user() -> None:
            nonlocal done
            for i in counter:
                kind = await one(client, i)
                if kind:
                    errors[kind] += 1
                done += 1
                if done % 1000 == 0:
                    on_progress(done)
        await asyncio.gather(*(user() for _ in range(concurrency)))
    return errors


def keys_without_expiry(client: redis.Redis) -> dict[str, str]:
    """Every key with no TTL, with its type and size."""
    sizes: dict[str, Any] = {"hash": client.hlen, "zset": client.zcard, "set": client.scard,
                             "list": client.llen, "stream": client.xlen}
    out: dict[str, str] = {}
    for key in client.scan_iter(count=1000):
        if client.ttl(key) == -1:
            kind = str(client.type(key))
            size = sizes[kind](key) if kind in sizes else 1
            out[str(key)] = f"{kind} ({size})"
    return out


@click.command()
@click.option("--requests", "n_requests", default=20000, show_default=True)
@click.option("--concurrency", default=32, show_default=True)
def main(n_requests: int, concurrency: int) -> None:
    """Send N_REQUESTS short requests; report errors, memory growth and Redis keys left without a TTL."""
    with private_stack(None, 120, env={"ENGINE": "scripted", "SERVED_MODEL_NAME": MODEL, "MAX_NUM_SEQS": "64",
                                       "LOG_LEVEL": "WARNING", "JOB_TTL": "600"}) as stack:
        base, redis_url = stack.base, stack.redis_url
        worker, api = psutil.Process(stack.worker.pid), psutil.Process(stack.api.pid)
        memory: list[tuple[int, float, float]] = []

        def progress(done: int) -> None:
            memory.append((done, tree_rss(worker) / 2**20, tree_rss(api) / 2**20))
            console.print(f"{done:>6} requests  {time.monotonic() - start:6.1f} s  "
                          f"worker {memory[-1][1]:.1f} MiB  API {memory[-1][2]:.1f} MiB")

        start = time.monotonic()
        errors = asyncio.run(drive(base, n_requests, concurrency, progress))
        elapsed = time.monotonic() - start
        time.sleep(3)  # the ledger drains the last usage entries
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        leftovers = keys_without_expiry(client)
        with_ttl = sum(1 for _ in client.scan_iter(count=1000)) - len(leftovers)
    first = memory[0] if memory else (0, 0.0, 0.0)
    last = memory[-1] if memory else (0, 0.0, 0.0)
    table = Table(title=f"soak: {n_requests} requests at concurrency {concurrency}")
    for col in ("requests/s", "errors", f"worker RSS at {first[0]} → {last[0]}",
                f"API RSS at {first[0]} → {last[0]}", "keys with TTL", "keys without TTL"):
        table.add_column(col)
    table.add_row(f"{n_requests / elapsed:.0f}", json.dumps(dict(errors)) if errors else "0",
                  f"{first[1]:.1f} → {last[1]:.1f} MiB", f"{first[2]:.1f} → {last[2]:.1f} MiB",
                  str(with_ttl), "\n".join(f"{k}: {v}" for k, v in sorted(leftovers.items())))
    console.print(table)
    print(json.dumps({"requests": n_requests, "elapsed_s": round(elapsed, 1), "errors": dict(errors),
                      "memory_mib": memory, "keys_with_ttl": with_ttl, "keys_without_ttl": leftovers}))


if __name__ == "__main__":
    main()
