"""Scale-out: throughput with 1, 2 and 4 workers, then workers joining, leaving and dying mid-run.

    python -m loadtest.scale_out --workers 1,2,4 --concurrency 48 --duration 20 --churn 40

Every worker runs the scripted engine (a test double) at a fixed pace per request,
``--tokens`` tokens ``--delay`` seconds apart, with ``--slots`` task slots: a
worker's capacity is fixed (``slots / (tokens * delay)`` requests per second) and
the CPU is not the limit. Starts a private Redis, the API and a first worker, then
adds workers (``inferq worker --engine scripted`` subprocesses on the same Redis
and model) and drives each size with the same closed-loop load of streamed chat
requests, above the total capacity. The ratio to one worker is the figure (ideal:
the number of workers).

The churn run (``--churn`` seconds, on a fresh stack with two workers) sends streamed
chat requests and ``/v1/jobs`` jobs at once; a quarter of the way in a third worker
is started, halfway the second gets SIGTERM (warm shutdown: it finishes what it
runs), at three quarters the third gets SIGKILL. It counts requests sent and
succeeded: every job must succeed (the recovery reaper runs the killed worker's
jobs again); a stream cut by the SIGKILL ends with ``worker_lost`` by design (its
tokens were already sent and cannot be replayed), so those are counted apart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import click
import httpx
import redis
from rich.console import Console
from rich.table import Table

from loadtest.driver import DriverConfig, RequestResult, make_client, send_one
from loadtest.plumbing import OUT_DIR, ROLES, ProcessGroups
from loadtest.stack import BENCH_KEY, free_port, redis_server, running_stack
from loadtest.stats import Summary, summarize
from loadtest.workload import RequestSpec
from queueing import keys, liveness

console = Console(width=max(shutil.get_terminal_size().columns, 160))
MODEL = "scripted-scale"


@dataclass(frozen=True)
class Pace:
    """The fixed work of one request: ``tokens`` tokens ``delay`` seconds apart, on ``slots`` per worker."""

    tokens: int
    delay: float
    slots: int

    @property
    def spec(self) -> RequestSpec:
        return RequestSpec(max_tokens=self.tokens, prompt=f"[[delay={self.delay}]] scale out")

    def capacity(self, workers: int) -> float:
        """Requests per second ``workers`` can finish at most."""
        return workers * self.slots / (self.tokens * self.delay)


# --- workers ------------------------------------------------------------------


class Fleet:
    """Extra ``inferq worker`` processes on the stack's Redis and model."""

    def __init__(self, env: dict[str, str], redis_url: str, slots: int):
        self.env = {**os.environ, "API_KEYS": BENCH_KEY, "WORKER_METRICS_PORT": "0", **env}
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.slots = slots
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        """Start one more worker (its output goes to ``$INFERQ_BENCH_LOGS/worker-N.log`` if set)."""
        log_dir = os.environ.get("INFERQ_BENCH_LOGS")
        name = f"worker-{len(self.procs) + 2}"
        out: Any = open(os.path.join(log_dir, f"{name}.log"), "wb") if log_dir else subprocess.DEVNULL
        proc = subprocess.Popen([sys.executable, "-m", "inferq.cli", "worker", "--engine", "scripted",
                                 "--concurrency", str(self.slots), "--loglevel", "WARNING"],
                                env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def live(self) -> int:
        """Workers whose heartbeat is current."""
        return liveness.live_models(self.redis)[MODEL]

    def wait_live(self, n: int, timeout: float = 120, settle: float = 2.0) -> None:
        """Until ``n`` workers beat, then ``settle`` seconds for their Celery consumers to start."""
        deadline = time.monotonic() + timeout
        while self.live() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.live()} of {n} workers live after {timeout:.0f}s")
            time.sleep(0.2)
        time.sleep(settle)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def stack(pace: Pace, api_workers: int, procs: list[subprocess.Popen[bytes]]) -> Iterator[tuple[str, Fleet]]:
    """A private Redis, the API and one worker; yields the base URL and the fleet for more workers."""
    env = {"ENGINE": "scripted", "SERVED_MODEL_NAME": MODEL, "MAX_NUM_SEQS": str(pace.slots),
           "MAX_QUEUE_DEPTH": "0", "LOG_LEVEL": "WARNING", "JOB_TTL": "3600"}
    with ExitStack() as cleanup:
        db_dir = cleanup.enter_context(tempfile.TemporaryDirectory())
        redis_url = cleanup.enter_context(redis_server())
        env.update(REDIS_URL=redis_url, DATABASE_URL=f"sqlite:///{db_dir}/scale.db")
        base = cleanup.enter_context(running_stack(free_port(), 120, api_args=("--workers", str(api_workers)),
                                                   procs=procs, **env))
        fleet = Fleet(env, redis_url, pace.slots)
        cleanup.callback(fleet.stop_all)
        fleet.wait_live(1, settle=0)
        yield base, fleet


# --- the steady runs ----------------------------------------------------------


@dataclass(frozen=True)
class Steady:
    """One fleet size under the same closed-loop load."""

    workers: int
    completed: int
    errors: dict[str, int]
    seconds: float
    latency: Summary | None
    ttft: Summary | None
    cpu_percent: dict[str, float]

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.seconds


def _config(base: str, concurrency: int, stream: bool = True) -> DriverConfig:
    return DriverConfig(base_url=f"{base}/v1", api_key=BENCH_KEY, model=MODEL, mode="chat", stream=stream,
                        concurrency=concurrency, timeout=300)


async def closed_loop(base: str, spec: RequestSpec, concurrency: int, warmup: float, duration: float
                      ) -> tuple[list[RequestResult], float]:
    """``concurrency`` users for ``warmup + duration`` seconds; returns every request (``start``
    counted from the beginning) and the time the measured window opened."""
    config = _config(base, concurrency)
    results: list[RequestResult] = []
    started = time.perf_counter()
    end = started + warmup + duration
    async with make_client(config) as client:
        async def user() -> None:
            while time.perf_counter() < end:
                results.append(await send_one(client, config, spec, started))

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return results, warmup


def steady(base: str, pace: Pace, workers: int, concurrency: int, warmup: float, duration: float,
           groups: ProcessGroups) -> Steady:
    """Requests finished within the measured window (after the warm-up), per second."""
    before, t0 = groups.cpu_seconds(), time.monotonic()
    results, opens = asyncio.run(closed_loop(base, pace.spec, concurrency, warmup, duration))
    elapsed = time.monotonic() - t0
    cpu = {role: round((s - before.get(role, 0.0)) / elapsed * 100, 1)
           for role, s in groups.cpu_seconds().items()}
    window = [r for r in results if opens <= r.start + r.latency <= opens + duration]
    ok = [r for r in window if r.ok]
    errors = Counter(r.error for r in results if r.error)
    return Steady(workers, len(ok), dict(errors), duration, summarize(r.latency for r in ok),
                  summarize(r.ttft for r in ok if r.ttft is not None), cpu)


def print_steady(runs: list[Steady], pace: Pace, concurrency: int) -> None:
    one = runs[0].requests_per_s / runs[0].workers if runs else 1.0
    table = Table(title=f"Scale-out: streamed chat, {pace.tokens} tokens {pace.delay * 1000:.0f} ms apart, "
                        f"{pace.slots} slots per worker, concurrency {concurrency}")
    for col in ("workers", "req/s", "ratio to 1 worker", "capacity", "of capacity", "tokens/s",
                "latency p50", "TTFT p50", "errors", "CPU % API/workers/Redis/client"):
        table.add_column(col, justify="right")
    for run in runs:
        cpu = "/".join(f"{run.cpu_percent.get(role, 0):.0f}" for role in ROLES)
        table.add_row(str(run.workers), f"{run.requests_per_s:.1f}", f"{run.requests_per_s / one:.2f}",
                      f"{pace.capacity(run.workers):.1f}",
                      f"{run.requests_per_s / pace.capacity(run.workers) * 100:.0f} %",
                      f"{run.requests_per_s * pace.tokens:.0f}",
                      f"{run.latency.p50 * 1000:.0f} ms" if run.latency else "-",
                      f"{run.ttft.p50 * 1000:.0f} ms" if run.ttft else "-",
                      json.dumps(run.errors) if run.errors else "0", cpu)
    console.print(table)


# --- the churn run ------------------------------------------------------------


@dataclass
class Tally:
    """Requests sent and how each ended, with the time (since the start) each ended."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    ends: list[tuple[float, str]] = field(default_factory=list)

    def record(self, started: float, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.ends.append((time.perf_counter() - started, outcome))


async def stream_user(client: httpx.AsyncClient, config: DriverConfig, spec: RequestSpec, started: float,
                      stop_at: float, tally: Tally) -> None:
    while time.perf_counter() < stop_at:
        tally.sent += 1
        result = await send_one(client, config, spec, started)
        tally.record(started, "ok" if result.ok else str(result.error))


async def job_user(client: httpx.AsyncClient, spec: RequestSpec, started: float, stop_at: float,
                   settle_by: float, tally: Tally) -> None:
    body = {"endpoint": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": spec.max_tokens, "messages": spec.as_messages()}}
    while time.perf_counter() < stop_at:
        tally.sent += 1
        try:
            created = await client.post("/jobs", json=body)
            if created.status_code != 202:
                tally.record(started, f"create {created.status_code}")
                continue
            job_id, status = created.json()["id"], "queued"
            while status in ("queued", "running") and time.perf_counter() < settle_by:
                wait = max(1.0, min(30.0, settle_by - time.perf_counter()))
                status = (await client.get(f"/jobs/{job_id}", params={"wait": wait})).json()["status"]
            tally.record(started, "ok" if status == "succeeded" else f"job {status}")
        except httpx.HTTPError as exc:
            tally.record(started, type(exc).__name__)


@dataclass
class Event:
    at: float
    what: str


async def churn_load(base: str, spec: RequestSpec, streams: int, job_users: int, seconds: float,
                     settle: float, fleet: Fleet) -> tuple[Tally, Tally, list[Event]]:
    """Streams and jobs for ``seconds`` while workers join, leave and die; then the jobs settle."""
    config = _config(base, streams + job_users)
    started = time.perf_counter()
    stop_at, settle_by = started + seconds, started + seconds + settle
    stream_tally, job_tally, timeline = Tally(), Tally(), []

    def note(what: str) -> None:
        timeline.append(Event(time.perf_counter() - started, what))
        console.print(f"t={timeline[-1].at:5.1f}s  {what}  (live workers: {fleet.live()})")

    async def choreography() -> None:
        second = fleet.procs[0]
        await asyncio.sleep(seconds / 4)
        third = fleet.start()
        note(f"worker 3 started (pid {third.pid})")
        await asyncio.sleep(seconds / 4)
        second.send_signal(signal.SIGTERM)
        note(f"worker 2 sent SIGTERM (pid {second.pid})")
        exited = asyncio.create_task(asyncio.to_thread(second.wait, 120))
        exited.add_done_callback(lambda task: note(f"worker 2 exited with code {task.result()}"))
        await asyncio.sleep(seconds / 4)
        third.send_signal(signal.SIGKILL)
        note(f"worker 3 sent SIGKILL (pid {third.pid})")
        await exited

    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    async with make_client(config) as client, httpx.AsyncClient(
            base_url=f"{base}/v1", headers=headers, timeout=httpx.Timeout(90, connect=30),
            limits=httpx.Limits(max_connections=job_users + 4)) as job_client:
        await asyncio.gather(
            choreography(),
            *(stream_user(client, config, spec, started, stop_at, stream_tally) for _ in range(streams)),
            *(job_user(job_client, spec, started, stop_at, settle_by, job_tally) for _ in range(job_users)))
    note("load finished")
    return stream_tally, job_tally, timeline


def job_records(redis_url: str) -> tuple[Counter[str], int, int]:
    """Every job record's status, how many were run more than once, and running-index entries left."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    statuses: Counter[str] = Counter()
    rerun = 0
    for key in client.scan_iter(match=keys.job("*"), count=1000):
        if key.endswith(":events") or client.type(key) != "hash":
            continue
        status, attempts = client.hmget(key, "status", "attempts")
        statuses[str(status or "?")] += 1
        rerun += int(attempts or 0) > 0
    return statuses, rerun, int(client.hlen(keys.RUNNING_JOBS))


def print_churn(streams: Tally, job_tally: Tally, timeline: list[Event], seconds: float,
                records: tuple[Counter[str], int, int]) -> None:
    table = Table(title=f"Churn: {seconds:.0f} s of streamed chat + /v1/jobs; a worker started, "
                        "one stopped (SIGTERM), one killed (SIGKILL)")
    for col in ("kind", "sent", "succeeded", "worker_lost", "other outcomes"):
        table.add_column(col, justify="right")
    for name, tally in (("streamed chat", streams), ("/v1/jobs", job_tally)):
        lost = sum(n for k, n in tally.outcomes.items() if "worker_lost" in k)
        other = {k: n for k, n in tally.outcomes.items() if k != "ok" and "worker_lost" not in k}
        table.add_row(name, str(tally.sent), str(tally.outcomes["ok"]), str(lost),
                      json.dumps(other) if other else "0")
    console.print(table)
    marks = [0.0, *(e.at for e in timeline if "sent SIG" in e.what or "started" in e.what), seconds]
    phases = Table(title="Completions per second between the events")
    for col in ("from", "to", "live workers", "streams ok/s", "jobs ok/s"):
        phases.add_column(col, justify="right")
    for (start, end), live in zip(zip(marks, marks[1:], strict=False), ("2", "3", "2", "1"), strict=False):
        def rate(t: Tally, a: float = start, b: float = end) -> str:
            return f"{sum(1 for at, o in t.ends if a <= at < b and o == 'ok') / max(b - a, 1e-9):.1f}"

        phases.add_row(f"{start:.1f} s", f"{end:.1f} s", live, rate(streams), rate(job_tally))
    console.print(phases)
    statuses, rerun, running_left = records
    console.print(f"job records in Redis by status: {dict(statuses)}; run again by the reaper: {rerun}; "
                  f"left in the running index: {running_left}")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command()
@click.option("--workers", "sizes", default="1,2,4", show_default=True, help="Fleet sizes, ascending.")
@click.option("--concurrency", default=48, show_default=True, help="Closed-loop users (above capacity).")
@click.option("--tokens", default=32, show_default=True)
@click.option("--delay", default=0.02, show_default=True, help="Seconds between two tokens of a request.")
@click.option("--slots", default=8, show_default=True, help="MAX_NUM_SEQS of each worker.")
@click.option("--duration", default=20.0, show_default=True, help="Measured seconds per fleet size.")
@click.option("--warmup", default=5.0, show_default=True, help="Seconds of load before each measurement.")
@click.option("--api-workers", default=1, show_default=True, help="API processes.")
@click.option("--churn", default=40.0, show_default=True, help="Seconds of the churn run (0: skip it).")
@click.option("--churn-streams", default=32, show_default=True, help="Streaming users in the churn run.")
@click.option("--churn-jobs", default=16, show_default=True, help="/v1/jobs users in the churn run.")
@click.option("--settle", default=120.0, show_default=True,
              help="Seconds after the churn run for the last jobs to end.")
def main(sizes: str, concurrency: int, tokens: int, delay: float, slots: int, duration: float, warmup: float,
         api_workers: int, churn: float, churn_streams: int, churn_jobs: int, settle: float) -> None:
    """Throughput ratio of 2 and 4 workers to one; then nothing lost while workers come and go."""
    pace = Pace(tokens, delay, slots)
    settings = {"pace": pace.__dict__, "concurrency": concurrency, "duration": duration, "warmup": warmup,
                "api_workers": api_workers}
    report: dict[str, Any] = {"settings": settings}
    runs: list[Steady] = []
    if _int_list(sizes):
        procs: list[subprocess.Popen[bytes]] = []
        with stack(pace, api_workers, procs) as (base, fleet):
            groups = ProcessGroups({procs[0].pid: "worker", procs[1].pid: "api"})
            for size in _int_list(sizes):
                while len(fleet.procs) + 1 < size:
                    groups.roles[fleet.start().pid] = "worker"
                fleet.wait_live(size)
                runs.append(steady(base, pace, size, concurrency, warmup, duration, groups))
                console.print(f"{size} worker(s): {runs[-1].requests_per_s:.1f} req/s "
                              f"(capacity {pace.capacity(size):.1f}), errors {runs[-1].errors or 0}, "
                              f"CPU % {runs[-1].cpu_percent}")
        print_steady(runs, pace, concurrency)
        report["steady"] = [{"workers": r.workers, "requests_per_s": round(r.requests_per_s, 2),
                             "ratio": round(r.requests_per_s / runs[0].requests_per_s * runs[0].workers, 3),
                             "capacity": round(pace.capacity(r.workers), 1), "errors": r.errors,
                             "latency_ms": r.latency.as_ms() if r.latency else None,
                             "ttft_ms": r.ttft.as_ms() if r.ttft else None, "cpu_percent": r.cpu_percent}
                            for r in runs]
    if churn > 0:
        procs = []
        with stack(pace, api_workers, procs) as (base, fleet):
            fleet.start()
            fleet.wait_live(2)
            streams, job_tally, timeline = asyncio.run(
                churn_load(base, pace.spec, churn_streams, churn_jobs, churn, settle, fleet))
            time.sleep(1)
            records = job_records(fleet.redis_url)
        print_churn(streams, job_tally, timeline, churn, records)
        report["churn"] = {"seconds": churn, "timeline": [e.__dict__ for e in timeline],
                           "streams": {"sent": streams.sent, "outcomes": dict(streams.outcomes)},
                           "jobs": {"sent": job_tally.sent, "outcomes": dict(job_tally.outcomes)},
                           "job_records": dict(records[0]), "rerun_by_reaper": records[1],
                           "running_index_left": records[2]}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "scale_out.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
