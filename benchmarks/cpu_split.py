"""Where the CPU goes during a stack run: per-process CPU share of worker, engine, API, Redis, client.

    python -m benchmarks.cpu_split --concurrency 16 --requests 32 --max-tokens 64
    python -m benchmarks.cpu_split --env ENGINE=scripted --env SERVED_MODEL_NAME=scripted-bench   # no model

Starts a worker and the API on a private ``redis-server`` and a private temporary
database, warms up, then reads every process's CPU time (the worker, its engine
processes, the API's gunicorn master and workers, that Redis, and this client) around
one run of the same workload as ``benchmarks.stack_vs_engine``. The last line of output
is the result as JSON.
"""

from __future__ import annotations

import json
import os
import time

import click
import psutil
from rich.console import Console
from rich.table import Table

from benchmarks.proc_cpu import cpu_seconds, title
from benchmarks.stack import private_stack
from benchmarks.stack_vs_engine import prompts, run_stack
from config import get_settings

console = Console()


def _cpu_times(roots: list[psutil.Process]) -> dict[tuple[int, str], float]:
    out: dict[tuple[int, str], float] = {}
    for root in roots:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in tree:
            out[(proc.pid, title(proc).strip()[:70])] = cpu_seconds(proc)
    return out


@click.command()
@click.option("--concurrency", default=16, show_default=True)
@click.option("--requests", "n_requests", default=32, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--port", type=int, help="Port for the API (default: a free one).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME=VALUE", help="A setting for worker and API.")
def main(concurrency: int, n_requests: int, max_tokens: int, port: int | None,
         extra_env: tuple[str, ...]) -> None:
    """CPU share per process (100 % = one core) during one streaming run through the stack."""
    overrides = dict(item.split("=", 1) for item in extra_env)
    os.environ.update(overrides)
    get_settings.cache_clear()
    s = get_settings()
    me = psutil.Process(os.getpid())
    with private_stack(port, 600, env=overrides) as stack:
        base = stack.base
        texts = prompts(n_requests)
        run_stack(base, s.served_model_name, texts[:concurrency], 8, concurrency)
        roots = [psutil.Process(p.pid) for p in stack.procs]  # worker, API, coordinator, redis-server
        before, started = _cpu_times(roots), time.monotonic()
        client_before = cpu_seconds(me)
        result = run_stack(base, s.served_model_name, texts, max_tokens, concurrency)
        elapsed = time.monotonic() - started
        after = _cpu_times(roots)
        client = cpu_seconds(me) - client_before
    table = Table(title=f"{result.tokens_per_s:.0f} output tok/s over {elapsed:.1f} s")
    table.add_column("CPU %", justify="right")
    table.add_column("process")
    rows = [((after[k] - before[k]) / elapsed * 100, k[1]) for k in after if k in before]
    rows.append((client / elapsed * 100, "benchmark client (this process)"))
    rows.sort(reverse=True)
    for share, name in rows:
        table.add_row(f"{share:.1f}", name)
    console.print(table)
    settings = {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens,
                "env": overrides}
    shares = [{"process": name.strip(), "percent": round(share, 2)} for share, name in rows]
    print(json.dumps({"settings": settings, "output_tokens_per_s": result.tokens_per_s, "seconds": elapsed,
                      "cpu_percent": shares}), flush=True)


if __name__ == "__main__":
    main()
