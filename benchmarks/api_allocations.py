"""Does the API keep Python objects per request? tracemalloc across many requests.

    python -m benchmarks.api_allocations --requests 3000

Starts a private Redis, a temporary database and one worker with the scripted engine (a test double),
builds the API app in this process, sends a warm-up, snapshots tracemalloc, sends
``--requests`` chat requests (a third streamed), snapshots again and prints the
largest growths with their tracebacks. Growth that does not scale with the
request count is one-time setup; growth that does is a leak.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import tracemalloc

import click

from benchmarks.stack import BENCH_KEY, bench_process
from inferq.launcher import inferq_argv, redis_server, stop_all, wait_for, worker_live

MODEL = "scripted-allocations"


@click.command()
@click.option("--requests", "n_requests", default=3000, show_default=True, help="Measured requests.")
@click.option("--warmup", default=500, show_default=True, help="Requests before the first snapshot.")
@click.option("--frames", default=15, show_default=True, help="Traceback depth tracemalloc keeps.")
@click.option("--top", default=8, show_default=True, help="Growths to print.")
def main(n_requests: int, warmup: int, frames: int, top: int) -> None:
    """Print the largest tracemalloc growths of the API app over N_REQUESTS requests."""
    with redis_server() as private_redis, tempfile.TemporaryDirectory() as tmp:
        url = private_redis.url
        env = {**os.environ, "REDIS_URL": url, "DATABASE_URL": f"sqlite:///{tmp}/api.db",
               "ENGINE": "scripted", "SERVED_MODEL_NAME": MODEL,
               "MAX_NUM_SEQS": "8", "WORKER_METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}
        worker = bench_process(inferq_argv("worker"), env, "worker")
        try:
            wait_for(worker_live(url, MODEL), 600, "worker", worker.proc)
            from api import create_app

            app = create_app({"redis_url": url, "database_url": f"sqlite:///{tmp}/api.db",
                              "api_keys": BENCH_KEY, "served_model_name": MODEL, "log_level": "WARNING"})
            http = app.test_client()
            headers = {"Authorization": f"Bearer {BENCH_KEY}"}
            body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}

            def run(n: int) -> None:
                for i in range(n):
                    resp = http.post("/v1/chat/completions", json={**body, "stream": i % 3 == 0},
                                     headers=headers)
                    resp.get_data()
                    if resp.status_code != 200:
                        raise click.ClickException(f"request {i}: {resp.status_code} {resp.get_data()!r}")

            run(warmup)
            tracemalloc.start(frames)
            gc.collect()
            before = tracemalloc.take_snapshot()
            run(n_requests)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            stop_all([worker], 30)
    growths = after.compare_to(before, "traceback")
    total = sum(stat.size_diff for stat in growths)
    click.echo(f"{n_requests} requests: {total / 1024:.1f} KiB net growth of traced Python memory "
               f"({total / max(n_requests, 1):.0f} B per request)")
    for stat in growths[:top]:
        click.echo(str(stat))
        for line in stat.traceback.format()[-6:]:
            click.echo(f"    {line}")
    click.echo(json.dumps({"requests": n_requests, "warmup": warmup, "net_growth_bytes": total,
                           "bytes_per_request": total / max(n_requests, 1),
                           "top": [{"size_diff": s.size_diff, "count_diff": s.count_diff,
                                    "where": s.traceback.format()[-2:]} for s in growths[:top]]}))


if __name__ == "__main__":
    main()
