"""Measure per key rate-limit accuracy over a minute window through a running API.

Creates a key with ``--rpm`` in DATABASE_URL, sends ``GET /v1/models`` at a steady
rate for ``--seconds``, and reports the most requests accepted in any 60 s
window (should equal the limit, never exceed it) and the total accepted; the last
line of output is the result as JSON. Point DATABASE_URL at the API's own database.

    python -m benchmarks.ratelimit_accuracy --base http://localhost:8020 --rpm 30 --rate 2 --seconds 150
"""

from __future__ import annotations

import bisect
import json
import time

import click
import httpx

from api.accounts.keys import create_key
from api.db import Database
from config import get_settings


@click.command()
@click.option("--base", default="http://127.0.0.1:8020", show_default=True)
@click.option("--rpm", default=30, show_default=True)
@click.option("--rate", default=2.0, show_default=True, help="Requests per second sent.")
@click.option("--seconds", default=150, show_default=True)
def main(base: str, rpm: int, rate: float, seconds: int) -> None:
    """Steady traffic against one key; report accepted requests per 60 s window."""
    db = Database(get_settings())
    db.create_schema()
    created = create_key(db, name="ratelimit-accuracy", rpm=rpm)
    accepted: list[float] = []
    refused = 0
    start = time.monotonic()
    with httpx.Client(timeout=10) as client:
        i = 0
        while (now := time.monotonic()) - start < seconds:
            resp = client.get(f"{base}/v1/models", headers={"X-API-Key": created.key})
            if resp.status_code == 200:
                accepted.append(now - start)
            else:
                refused += 1
            i += 1
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
    windows = [bisect.bisect_left(accepted, t + 60) - k for k, t in enumerate(accepted)]
    click.echo(f"sent {len(accepted) + refused} at {rate}/s for {seconds}s with rpm={rpm}: "
               f"accepted {len(accepted)}, refused {refused}; most accepted in any 60 s window: "
               f"{max(windows, default=0)} (limit {rpm})")
    click.echo(json.dumps({"rpm": rpm, "rate": rate, "seconds": seconds, "accepted": len(accepted),
                           "refused": refused, "most_in_60s": max(windows, default=0)}))


if __name__ == "__main__":
    main()
