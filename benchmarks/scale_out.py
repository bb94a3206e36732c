"""Scale-out: throughput with 1, 2 and 4 workers, alternated over rounds; then workers joining, leaving
and dying mid-run.

    python -m benchmarks.scale_out --workers 1,2,4 --concurrency 48 --duration 20 --churn 40

Every worker runs the scripted engine (a test double) at a fixed pace per request,
``--tokens`` tokens ``--delay`` seconds apart, with ``--slots`` task slots: a
worker's capacity is fixed (``slots / (tokens * delay)`` requests per second) and
the CPU is not the limit. One private stack (its own Redis, database and API) holds
a fleet of ``inferq worker --engine scripted --concurrency SLOTS`` processes (the
stack's first worker, which has Celery's default slots, is replaced by one of them).
Each of ``--rounds`` rounds measures every fleet size, in order in odd rounds and
reversed in even ones (1,2,4 then 4,2,1 ...): before each measurement the fleet is
brought to exactly that many live workers (more are started, or the newest get
SIGTERM and are waited for until they exited and their heartbeat is gone), then the
same closed-loop load of streamed chat requests, above the total capacity, runs for
``--warmup`` seconds unmeasured and ``--duration`` seconds measured. It prints each
round's figures, then per fleet size the median and the spread (min..max); the ratio
of the median to that of one worker is the figure (ideal: the number of workers).

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
import shutil
import signal
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import click
import httpx
import redis
from rich.console import Console
from rich.table import Table

from benchmarks.fleet import MODEL, Fleet, stack
from benchmarks.plumbing import OUT_DIR, ROLES
from benchmarks.proc_cpu import ProcessGroups
from benchmarks.stack import BENCH_KEY
from benchmarks.vs_vllm_report import spread
from loadtest.driver import DriverConfig, RequestResult, make_client, send_one
from loadtest.stats import Summary, summarize
from loadtest.workload import RequestSpec
from queueing import keys

console = Console(width=max(shutil.get_terminal_size().columns, 160))


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


# --- the steady runs ----------------------------------------------------------


@dataclass(frozen=True)
class Steady:
    """One fleet size, in one round, under the same closed-loop load."""

    round: int
    workers: int
    live: int  # workers with a current heartbeat when the load started
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


def steady(base: str, pace: Pace, fleet: Fleet, workers: int, round_: int, concurrency: int, warmup: float,
           duration: float, groups: ProcessGroups) -> Steady:
    """Requests finished within the measured window (after the warm-up), per second."""
    live = fleet.live()
    before, t0 = groups.cpu_seconds(), time.monotonic()
    results, opens = asyncio.run(closed_loop(base, pace.spec, concurrency, warmup, duration))
    elapsed = time.monotonic() - t0
    cpu = {role: round((s - before.get(role, 0.0)) / elapsed * 100, 1)
           for role, s in groups.cpu_seconds().items()}
    window = [r for r in results if opens <= r.start + r.latency <= opens + duration]
    ok = [r for r in window if r.ok]
    errors = Counter(r.error for r in results if r.error)
    return Steady(round_, workers, live, len(ok), dict(errors), duration, summarize(r.latency for r in ok),
                  summarize(r.ttft for r in ok if r.ttft is not None), cpu)


def run_rounds(base: str, pace: Pace, fleet: Fleet, groups: ProcessGroups, sizes: list[int], rounds: int,
               concurrency: int, warmup: float, duration: float) -> list[Steady]:
    """``rounds`` rounds over ``sizes``, forward in odd rounds and reversed in even ones; before each
    measurement exactly that many workers are live."""
    runs: list[Steady] = []
    for round_ in range(1, rounds + 1):
        for size in sizes if round_ % 2 else sizes[::-1]:
            for proc in fleet.resize(size):
                groups.roles[proc.pid] = "worker"
            run = steady(base, pace, fleet, size, round_, concurrency, warmup, duration, groups)
            if run.live != size:
                raise RuntimeError(f"round {round_}: {run.live} workers live, not {size}")
            runs.append(run)
            console.print(f"round {round_}, {size} worker(s): {run.requests_per_s:.1f} req/s "
                          f"(capacity {pace.capacity(size):.1f}), errors {run.errors or 0}, "
                          f"CPU % {run.cpu_percent}")
    return runs


def figures(run: Steady, pace: Pace, one: float) -> dict[str, float | None]:
    """One run's figures; ``one`` is the req/s per worker of the smallest fleet (in the same round, or the
    median)."""
    return {"requests_per_s": run.requests_per_s, "ratio": run.requests_per_s / one,
            "of_capacity": run.requests_per_s / pace.capacity(run.workers),
            "latency_p50_ms": run.latency.p50 * 1000 if run.latency else None,
            "ttft_p50_ms": run.ttft.p50 * 1000 if run.ttft else None,
            **{f"cpu_{role}": run.cpu_percent.get(role, 0.0) for role in ROLES}}


Rows = list[dict[str, Any]]


def summarize_rounds(runs: list[Steady], pace: Pace) -> tuple[Rows, dict[int, dict[str, Any]]]:
    """Each run's figures (ratio to the smallest fleet of its round), and per fleet size the median, min and
    max of each figure over the rounds, with the ratio of the medians and the errors summed."""
    smallest = min(r.workers for r in runs)
    one_in = {r.round: r.requests_per_s / r.workers for r in runs if r.workers == smallest}
    figs = [figures(r, pace, one_in[r.round]) for r in runs]
    rows = [{"round": r.round, "workers": r.workers, "live": r.live, "errors": r.errors, **f}
            for r, f in zip(runs, figs, strict=True)]
    sizes = sorted({r.workers for r in runs})
    medians = {n: statistics.median(r.requests_per_s for r in runs if r.workers == n) for n in sizes}
    summary: dict[int, dict[str, Any]] = {}
    for n in sizes:
        errors: Counter[str] = Counter()
        for r in runs:
            errors.update(r.errors if r.workers == n else {})
        stats = spread([f for r, f in zip(runs, figs, strict=True) if r.workers == n])
        summary[n] = {**stats, "ratio_of_medians": medians[n] / (medians[smallest] / smallest),
                      "capacity": pace.capacity(n), "errors": dict(errors)}
    return rows, summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _cpu(values: dict[str, float | None]) -> str:
    return "/".join(f"{values[f'cpu_{role}'] or 0:.0f}" for role in ROLES)


def print_steady(rows: Rows, summary: dict[int, dict[str, Any]], pace: Pace,
                 concurrency: int) -> None:
    """The rounds' rows, then per fleet size the medians and the spread (min..max) over the rounds."""
    what = (f"streamed chat, {pace.tokens} tokens {pace.delay * 1000:.0f} ms apart, {pace.slots} slots per "
            f"worker, concurrency {concurrency}")
    table = Table(title=f"Scale-out, each round: {what}")
    for col in ("round", "workers", "req/s", "ratio to 1 worker", "capacity", "of capacity", "tokens/s",
                "latency p50", "TTFT p50", "errors", "CPU % API/workers/Redis/client"):
        table.add_column(col, justify="right")
    for i, row in enumerate(rows):
        n = row["workers"]
        table.add_row(str(row["round"]), str(n), f"{row['requests_per_s']:.1f}", f"{row['ratio']:.2f}",
                      f"{pace.capacity(n):.1f}", f"{row['of_capacity'] * 100:.0f} %",
                      f"{row['requests_per_s'] * pace.tokens:.0f}", _ms(row["latency_p50_ms"]),
                      _ms(row["ttft_p50_ms"]), json.dumps(row["errors"]) if row["errors"] else "0", _cpu(row),
                      end_section=i + 1 < len(rows) and rows[i + 1]["round"] != row["round"])
    console.print(table)
    rounds = len({row["round"] for row in rows})
    table = Table(title=f"Scale-out, median of {rounds} alternated rounds (ratio: of the medians; spread: "
                        f"min..max of the rounds): {what}")
    for col in ("workers", "req/s", "req/s spread", "ratio to 1 worker", "ratio spread",
                "capacity", "of capacity", "latency p50", "TTFT p50", "errors",
                "CPU % API/workers/Redis/client"):
        table.add_column(col, justify="right")
    for n, s in summary.items():
        rps, ratio = s["requests_per_s"], s["ratio"]

        def med(key: str, st: dict[str, Any] = s) -> float | None:
            return st[key]["median"] if st[key] else None

        table.add_row(str(n), f"{rps['median']:.1f}", f"{rps['min']:.1f}..{rps['max']:.1f}",
                      f"{s['ratio_of_medians']:.2f}", f"{ratio['min']:.2f}..{ratio['max']:.2f}",
                      f"{s['capacity']:.1f}", f"{s['of_capacity']['median'] * 100:.0f} %",
                      _ms(med("latency_p50_ms")), _ms(med("ttft_p50_ms")),
                      json.dumps(s["errors"]) if s["errors"] else "0",
                      _cpu({f"cpu_{role}": med(f"cpu_{role}") for role in ROLES}))
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


def _round(value: Any) -> Any:
    """Floats (also inside dicts) to 3 decimals, for the JSON report."""
    if isinstance(value, float):
        return round(value, 3)
    return {k: _round(v) for k, v in value.items()} if isinstance(value, dict) else value


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command()
@click.option("--workers", "sizes", default="1,2,4", show_default=True,
              help="Fleet sizes, ascending; odd rounds run them in this order, even rounds reversed.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Rounds over the fleet sizes (at least 3 for published figures).")
@click.option("--concurrency", default=48, show_default=True, help="Closed-loop users (above capacity).")
@click.option("--tokens", default=32, show_default=True, help="Tokens per request.")
@click.option("--delay", default=0.02, show_default=True, help="Seconds between two tokens of a request.")
@click.option("--slots", default=8, show_default=True,
              help="Task slots (worker --concurrency) and MAX_NUM_SEQS of each worker.")
@click.option("--duration", default=20.0, show_default=True,
              help="Measured seconds per fleet size and round.")
@click.option("--warmup", default=5.0, show_default=True,
              help="Seconds of the same load before each measurement, unmeasured.")
@click.option("--api-workers", default=1, show_default=True, help="API processes.")
@click.option("--churn", default=40.0, show_default=True, help="Seconds of the churn run (0: skip it).")
@click.option("--churn-streams", default=32, show_default=True, help="Streaming users in the churn run.")
@click.option("--churn-jobs", default=16, show_default=True, help="/v1/jobs users in the churn run.")
@click.option("--settle", default=120.0, show_default=True,
              help="Seconds after the churn run for the last jobs to end.")
def main(sizes: str, rounds: int, concurrency: int, tokens: int, delay: float, slots: int, duration: float,
         warmup: float, api_workers: int, churn: float, churn_streams: int, churn_jobs: int, settle: float
         ) -> None:
    """Throughput of 1, 2 and 4 workers (alternated rounds; median ratio to one worker); then nothing lost
    while workers come and go."""
    pace = Pace(tokens, delay, slots)
    settings = {"pace": pace.__dict__, "rounds": rounds, "concurrency": concurrency, "duration": duration,
                "warmup": warmup, "api_workers": api_workers}
    report: dict[str, Any] = {"settings": settings}
    if _int_list(sizes):
        procs: list[subprocess.Popen[bytes]] = []
        with stack(slots, api_workers, procs) as (base, fleet):
            groups = ProcessGroups({procs[1].pid: "api"})
            groups.roles[fleet.take_over(procs[0]).pid] = "worker"
            runs = run_rounds(base, pace, fleet, groups, _int_list(sizes), rounds, concurrency, warmup,
                              duration)
        rows, summary = summarize_rounds(runs, pace)
        print_steady(rows, summary, pace, concurrency)
        report["rounds"] = [_round(row) for row in rows]
        report["summary"] = {str(n): _round(s) for n, s in summary.items()}
    if churn > 0:
        procs = []
        with stack(slots, api_workers, procs) as (base, fleet):
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
