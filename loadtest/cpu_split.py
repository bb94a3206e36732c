"""Where the CPU goes during a stack run: per-process CPU share of worker, engine, API, Redis, client.

    python -m loadtest.cpu_split --concurrency 16 --requests 32 --max-tokens 64

Starts a worker and the API (Redis at REDIS_URL), warms up, then samples every
process's CPU time around one run of the same workload as ``loadtest.stack_vs_engine``.
"""

from __future__ import annotations

import os
import time

import click
import psutil
from rich.console import Console
from rich.table import Table

from config import get_settings
from loadtest.stack import running_stack
from loadtest.stack_vs_engine import prompts, run_stack

console = Console()


def _cpu_times(roots: list[psutil.Process]) -> dict[tuple[int, str], float]:
    out: dict[tuple[int, str], float] = {}
    for root in roots:
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                out[(proc.pid, " ".join(proc.cmdline()[:4])[-70:] or proc.name())] = times.user + times.system
            except psutil.Error:
                pass
    return out


@click.command()
@click.option("--concurrency", default=16, show_default=True)
@click.option("--requests", "n_requests", default=32, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--port", default=8076, show_default=True)
def main(concurrency: int, n_requests: int, max_tokens: int, port: int) -> None:
    """CPU share per process (100 % = one core) during one streaming run through the stack."""
    s = get_settings()
    me = psutil.Process(os.getpid())
    with running_stack(port) as base:
        texts = prompts(n_requests)
        run_stack(base, s.served_model_name, texts[:concurrency], 8, concurrency)
        redis_servers = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"]
        roots = [*me.children(), *redis_servers]
        before, started = _cpu_times(roots), time.monotonic()
        client_before = sum(me.cpu_times()[:2])
        result = run_stack(base, s.served_model_name, texts, max_tokens, concurrency)
        elapsed = time.monotonic() - started
        after = _cpu_times(roots)
        client = sum(me.cpu_times()[:2]) - client_before
    table = Table(title=f"{result.tokens_per_s:.0f} output tok/s over {elapsed:.1f} s")
    table.add_column("CPU %", justify="right")
    table.add_column("process")
    rows = [((after[k] - before[k]) / elapsed * 100, k[1]) for k in after if k in before]
    rows.append((client / elapsed * 100, "benchmark client (this process)"))
    for share, name in sorted(rows, reverse=True):
        table.add_row(f"{share:.1f}", name)
    console.print(table)


if __name__ == "__main__":
    main()
