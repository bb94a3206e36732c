"""Plumbing overhead: what the API, Redis, Celery and pub/sub add to a request, the engine set aside.

    python -m benchmarks.plumbing --requests 2000 --levels 1,32,256 --api-workers 1,2 --pairs 3

Starts a private Redis, one worker with the scripted engine (a test double that
emits its ``--max-tokens`` tokens at once: no model, no delay) and the API, then,
for each number of API processes, each mode (buffered and streamed chat) and each
concurrency: a warm-up, then ``--requests`` requests in a closed loop, measured by
the client. Buffered chat is also run at ``--rate-levels`` to find the highest
request rate.

The baseline is the same scripted engine driven directly in this process from a
thread pool at the same concurrency, with the same request count and warm-up,
alternated with the stack at each level (engine alone, stack, engine alone, stack
..., ``--pairs`` pairs): "added" is what the stack costs over the engine alone. It
prints each pair, then per level the median and the spread (min..max) over the
pairs. A bare Redis PING round trip is measured for scale, and the CPU time each
process spent during each stack run (100 % = one core) shows what saturates.

With ``--profile`` (the default) py-spy samples the API (gunicorn and its gevent
workers) and the worker during one extra, unmeasured pass at concurrency 32 (each
mode) and the top functions by own time are printed; the collapsed stacks are kept
in ``benchmarks/out/`` (``py-spy`` must be installed beside this Python).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import redis
from rich.console import Console
from rich.table import Table

from benchmarks.proc_cpu import ProcessGroups
from benchmarks.profiling import print_profile, profiled
from benchmarks.stack import BENCH_KEY, running_stack
from benchmarks.vs_vllm_report import spread
from inferq.launcher import free_port, redis_server
from loadtest.driver import DriverConfig, RequestResult, make_client, request_body, send_one
from loadtest.stats import Aggregate, Summary, aggregate, summarize
from loadtest.workload import Workload
from queueing import events
from queueing.jobs import JobRequest

console = Console(width=max(shutil.get_terminal_size().columns, 160))
MODEL = "scripted-plumbing"
OUT_DIR = Path(__file__).with_name("out")
MODES = ("buffered", "stream")
PROFILE_CONCURRENCY = 32


@dataclass(frozen=True)
class EngineRun:
    """The scripted engine driven directly: latency and time to first token, in seconds."""

    requests: int
    elapsed: float
    latency: Summary
    ttft: Summary

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed


ROLES = ("api", "worker", "coordinator", "redis-server", "client")


@dataclass(frozen=True)
class Pair:
    """One (engine alone, stack) pair at a level: the stack's figures, the engine-alone baseline run just
    before it, CPU seconds per role over the stack's measured requests, and the machine's 1-minute load
    average when it ended (other tenants' load included)."""

    stack: Aggregate
    engine: EngineRun
    cpu_seconds: dict[str, float]
    loadavg: float

    def cpu_ms(self, role: str) -> float:
        """CPU milliseconds ``role`` spent per measured request."""
        return self.cpu_seconds.get(role, 0.0) * 1000 / max(self.stack.completed + self.stack.failed, 1)

    @property
    def server_cpu_ms(self) -> float:
        """API + worker + coordinator + Redis CPU milliseconds per request (the client left out)."""
        return sum(self.cpu_ms(role) for role in ROLES[:4])

    def figures(self) -> dict[str, float | None]:
        lat, ttft, engine_p50 = self.stack.latency, self.stack.ttft, self.engine.latency.p50 * 1000
        return {"req_s": self.stack.requests_per_s, "p50_ms": lat.p50 * 1000 if lat else None,
                "p99_ms": lat.p99 * 1000 if lat else None, "ttft_p50_ms": ttft.p50 * 1000 if ttft else None,
                "engine_p50_ms": engine_p50, "added_p50_ms": lat.p50 * 1000 - engine_p50 if lat else None,
                "engine_req_s": self.engine.requests_per_s,
                **{f"{role}_cpu_ms": self.cpu_ms(role) for role in ROLES},
                "server_cpu_ms": self.server_cpu_ms, "failed": float(self.stack.failed), "load": self.loadavg}


@dataclass(frozen=True)
class Level:
    """One level (API processes, mode, concurrency) and its alternated pairs."""

    api_workers: int
    mode: str
    concurrency: int
    pairs: list[Pair]

    def stats(self) -> dict[str, dict[str, float] | None]:
        """Per figure: median, min and max over the pairs."""
        return spread([p.figures() for p in self.pairs])

    def median(self, key: str) -> float:
        s = self.stats()[key]
        return s["median"] if s else 0.0

    @property
    def failed(self) -> int:
        return sum(p.stack.failed for p in self.pairs)


# --- the load -----------------------------------------------------------------


async def _requests(client: httpx.AsyncClient, config: DriverConfig, workload: Workload, n: int
                    ) -> list[RequestResult]:
    """``n`` requests, ``config.concurrency`` at a time, each sent as soon as a slot frees."""
    results: list[RequestResult] = []
    todo = iter(range(n))
    started = time.perf_counter()

    async def user() -> None:
        for _ in todo:
            results.append(await send_one(client, config, workload.next(), started))

    await asyncio.gather(*(user() for _ in range(config.concurrency)))
    return results


async def _warm_then_measure(config: DriverConfig, workload: Workload, warmup: int, n: int,
                             cpu: ProcessGroups | None, cpu_seconds: dict[str, float]
                             ) -> tuple[list[RequestResult], float]:
    async with make_client(config) as client:
        await _requests(client, config, workload, warmup)  # opens the connections, fills pools
        before = cpu.cpu_seconds() if cpu else {}
        start = time.perf_counter()
        results = await _requests(client, config, workload, n)
        elapsed = time.perf_counter() - start
        if cpu:
            cpu_seconds.update({role: s - before.get(role, 0.0) for role, s in cpu.cpu_seconds().items()})
        return results, elapsed


def _config(base: str, mode: str, concurrency: int) -> DriverConfig:
    return DriverConfig(base_url=f"{base}/v1", api_key=BENCH_KEY, model=MODEL, mode="chat",
                        stream=mode == "stream", concurrency=concurrency, timeout=120)


def _workload(concurrency: int, max_tokens: int) -> Workload:
    return Workload(prompt_tokens=16, max_tokens=max_tokens, seed=concurrency)


def drive_stack(base: str, mode: str, concurrency: int, n: int, warmup: int, max_tokens: int,
                cpu: ProcessGroups | None = None, cpu_seconds: dict[str, float] | None = None) -> Aggregate:
    """A warm-up, then ``n`` chat requests at ``concurrency`` through the whole stack; with ``cpu``,
    each role's CPU seconds over the measured requests go into ``cpu_seconds``."""
    config = _config(base, mode, concurrency)
    workload = _workload(concurrency, max_tokens)
    results, elapsed = asyncio.run(_warm_then_measure(config, workload, warmup, n, cpu,
                                                      {} if cpu_seconds is None else cpu_seconds))
    return aggregate(results, elapsed)


def engine_alone(mode: str, concurrency: int, n: int, warmup: int, max_tokens: int) -> EngineRun:
    """The baseline: ``ScriptedEngine.stream`` called from ``concurrency`` threads, ``n`` times, with the
    job requests the stack's worker gets for the same chat bodies (streamed or buffered, as ``mode``).

    Its time to first token is when the first delta carrying tokens arrives (a buffered request has
    none: then it is when the response body arrives, as for a client)."""
    from workers.scripted_engine import ScriptedEngine

    engine = ScriptedEngine(model=MODEL)
    config, workload = _config("", mode, concurrency), _workload(concurrency, max_tokens)
    jobs = []
    for _ in range(warmup + n):
        path, body = request_body(config, workload.next())
        jobs.append(JobRequest(endpoint=config.base_url + path, model=MODEL, body=body))

    def one(i: int) -> tuple[float, float]:
        start, ttft = time.perf_counter(), 0.0
        for event in engine.stream(f"direct-{i}", jobs[i]):
            if isinstance(event, events.Delta):
                if not ttft and event.tokens > 0:
                    ttft = time.perf_counter() - start
            elif not isinstance(event, events.Done):
                raise RuntimeError(f"the scripted engine did not answer: {event}")
        latency = time.perf_counter() - start
        return latency, ttft or latency

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(warmup)))
        start = time.perf_counter()
        timings = list(pool.map(one, range(warmup, warmup + n)))
        elapsed = time.perf_counter() - start
    latency, ttft = summarize(t[0] for t in timings), summarize(t[1] for t in timings)
    assert latency is not None and ttft is not None
    return EngineRun(n, elapsed, latency, ttft)


def redis_ping(url: str, n: int = 2000) -> Summary:
    """Round-trip time of ``n`` sequential PINGs on one connection."""
    client = redis.Redis.from_url(url)
    client.ping()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - start)
    summary = summarize(times)
    assert summary is not None
    return summary


# --- the run ------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _ms_or_dash(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def run_levels(base: str, groups: ProcessGroups, api_workers: int, levels: dict[str, list[int]], n: int,
               warmup: int, max_tokens: int, pairs: int) -> list[Level]:
    """Every mode at every concurrency: ``pairs`` pairs of (engine alone, stack), alternated, each run after
    the same warm-up."""
    out = []
    for mode in MODES:
        for concurrency in levels[mode]:
            warm = max(warmup, 2 * concurrency)
            lv = Level(api_workers, mode, concurrency, [])
            for i in range(1, pairs + 1):
                engine = engine_alone(mode, concurrency, n, warm, max_tokens)
                cpu: dict[str, float] = {}
                stack = drive_stack(base, mode, concurrency, n, warm, max_tokens, groups, cpu)
                lv.pairs.append(pair := Pair(stack, engine, cpu, os.getloadavg()[0]))
                f = pair.figures()
                cpu_ms = " ".join(f"{r} {pair.cpu_ms(r):.1f}" for r in ROLES)
                console.print(f"API x{api_workers} {mode} c={concurrency:<3} pair {i}: engine alone p50 "
                              f"{f['engine_p50_ms']:.3f} ms; stack {f['req_s']:6.0f} req/s p50 "
                              f"{_ms_or_dash(f['p50_ms'])} ms (added {_ms_or_dash(f['added_p50_ms'])})  "
                              f"errors {stack.errors or 0}  CPU ms/request {cpu_ms}  load {pair.loadavg:.1f}")
            out.append(lv)
    return out


#: (figure, column title, format, spread printed) of the table: the median of the pairs (and min..max).
TABLE = (("req_s", "req/s", "{:.0f}", True), ("added_p50_ms", "added p50", "{:+.1f}", True),
         ("p50_ms", "p50", "{:.1f}", False), ("p99_ms", "p99", "{:.1f}", False),
         ("ttft_p50_ms", "TTFT p50", "{:.1f}", False), ("engine_p50_ms", "engine p50", "{:.3f}", False))


def print_levels(levels: list[Level], ping: Summary) -> None:
    pairs = len(levels[0].pairs) if levels else 0
    table = Table(title=f"Plumbing overhead (scripted engine, no delay): median of {pairs} alternated pairs "
                        f"(engine alone, stack), spread min..max; Redis PING p50 {ping.p50 * 1000:.3f} ms, "
                        f"p99 {ping.p99 * 1000:.3f} ms")
    for col in ("API", "mode", "conc", *(title for _, title, _, _ in TABLE),
                "CPU ms/req API/worker/coordinator/Redis/client", "failed", "load"):
        table.add_column(col, justify="right")
    for lv in levels:
        st = lv.stats()
        cells = []
        for key, _, fmt, with_spread in TABLE:
            s = st[key]
            cell = "-" if s is None else fmt.format(s["median"])
            if s is not None and with_spread and pairs > 1:
                cell += f" ({fmt.format(s['min'])}..{fmt.format(s['max'])})"
            cells.append(cell)
        table.add_row(str(lv.api_workers), lv.mode, str(lv.concurrency), *cells,
                      "/".join(f"{lv.median(f'{r}_cpu_ms'):.1f}" for r in ROLES), str(lv.failed),
                      f"{lv.median('load'):.1f}")
    console.print(table)
    console.print("Times in ms. engine = ScriptedEngine.stream driven in-process at the same concurrency, "
                  "alternated with the stack; added = stack p50 - engine p50; load = 1-minute load average "
                  "(all tenants).")


def best_rate(levels: list[Level]) -> dict[int, Level]:
    """Per number of API processes: the level with the highest median request rate and no errors."""
    best: dict[int, Level] = {}
    for lv in levels:
        current = best.get(lv.api_workers)
        if lv.failed == 0 and (current is None or lv.median("req_s") > current.median("req_s")):
            best[lv.api_workers] = lv
    return best


def level_json(lv: Level) -> dict[str, Any]:
    return {"api_workers": lv.api_workers, "mode": lv.mode, "concurrency": lv.concurrency,
            "requests": lv.pairs[0].stack.completed + lv.pairs[0].stack.failed, "failed": lv.failed,
            "errors": [p.stack.errors for p in lv.pairs], "pairs": [p.figures() for p in lv.pairs],
            "stats": lv.stats()}


def summary_lines(levels: list[Level], max_tokens: int) -> list[str]:
    """The sentences docs/benchmarks.md quotes (medians of the pairs): overhead at concurrency 1, the best
    rate, the CPU ceiling."""
    lines = []
    for lv in levels:
        added, spread_ = lv.median("added_p50_ms"), lv.stats()["added_p50_ms"]
        if lv.concurrency == 1 and spread_:
            lines.append(f"{lv.mode} chat, {lv.api_workers} API process(es), concurrency 1: the stack adds "
                         f"{added:.1f} ms at p50 over the engine alone (pairs: "
                         f"{', '.join(_ms_or_dash(p.figures()['added_p50_ms']) for p in lv.pairs)})")
    for n_api, lv in sorted(best_rate(levels).items()):
        cpu_ms = lv.median("server_cpu_ms")
        ceiling = 2000 / cpu_ms if cpu_ms else 0.0
        lines.append(f"highest rate with {n_api} API process(es): {lv.median('req_s'):.0f} req/s "
                     f"({lv.mode} chat, concurrency {lv.concurrency}, {max_tokens} tokens each); the servers "
                     f"spent {cpu_ms:.1f} CPU ms per request, i.e. at most {ceiling:.0f} req/s "
                     f"on {os.cpu_count()} free cores")
    return lines


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@click.command()
@click.option("--requests", "n_requests", default=2000, show_default=True,
              help="Measured requests per level.")
@click.option("--warmup", default=200, show_default=True,
              help="Warm-up requests before each level (at least twice the concurrency).")
@click.option("--levels", default="1,32,256", show_default=True, help="Concurrencies, both modes.")
@click.option("--rate-levels", default="8,64,128", show_default=True,
              help="More concurrencies for buffered chat only, to find the highest request rate.")
@click.option("--api-workers", default="1,2", show_default=True, help="Numbers of API processes to measure.")
@click.option("--max-tokens", default=8, show_default=True)
@click.option("--profile/--no-profile", default=True, show_default=True,
              help="py-spy the API and the worker during an extra pass at concurrency 32.")
@click.option("--env", "extra_env", multiple=True, metavar="NAME=VALUE",
              help="A setting for the worker and API (repeatable).")
@click.option("--pairs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Alternating (engine alone, stack) run pairs per level.")
def main(n_requests: int, warmup: int, levels: str, rate_levels: str, api_workers: str, max_tokens: int,
         profile: bool, extra_env: tuple[str, ...], pairs: int) -> None:
    """Latency and rate of short chat requests through the stack vs the scripted engine alone."""
    by_mode = {"stream": sorted(set(_int_list(levels))),
               "buffered": sorted(set(_int_list(levels) + _int_list(rate_levels)))}
    overrides = dict(item.split("=", 1) for item in extra_env)
    measured: list[Level] = []
    paths: dict[str, Path] = {}
    ping: Summary | None = None
    for index, n_api in enumerate(_int_list(api_workers)):
        procs: list[subprocess.Popen[bytes]] = []
        with tempfile.TemporaryDirectory() as db_dir, redis_server() as private_redis, running_stack(
                free_port(), 120, api_args=("--workers", str(n_api)), procs=procs,
                REDIS_URL=private_redis.url, DATABASE_URL=f"sqlite:///{db_dir}/plumbing.db",
                ENGINE="scripted", SERVED_MODEL_NAME=MODEL, MAX_NUM_SEQS="256", MAX_QUEUE_DEPTH="0",
                LOG_LEVEL="WARNING", JOB_TTL="600",
                **overrides) as base:
            worker, api, coordinator = procs
            groups = ProcessGroups({worker.pid: "worker", api.pid: "api", coordinator.pid: "coordinator"})
            if ping is None:
                ping = redis_ping(private_redis.url)
                console.print(f"Redis PING p50 {ping.p50 * 1000:.3f} ms, p99 {ping.p99 * 1000:.3f} ms")
            measured += run_levels(base, groups, n_api, by_mode, n_requests, warmup, max_tokens, pairs)
            if profile and index == 0:
                with profiled({"api": api.pid, "worker": worker.pid}, OUT_DIR, "plumbing") as paths:
                    for mode in MODES:
                        drive_stack(base, mode, PROFILE_CONCURRENCY, n_requests, PROFILE_CONCURRENCY,
                                    max_tokens)
    assert ping is not None
    print_levels(measured, ping)
    lines = summary_lines(measured, max_tokens)
    for line in lines:
        console.print(line)
    settings = {"requests": n_requests, "warmup": warmup, "levels": by_mode, "max_tokens": max_tokens,
                "api_workers": _int_list(api_workers), "pairs": pairs, "env": overrides}
    report = {"settings": settings,
              "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model()},
              "redis_ping_ms": ping.as_ms(), "levels": [level_json(lv) for lv in measured],
              "summary": lines}
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "plumbing.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    if paths:
        title = f"(c={PROFILE_CONCURRENCY}, both modes)"
        report["profiles"] = {name: print_profile(console, f"{name} {title}", path)
                              for name, path in paths.items()}
        (OUT_DIR / "plumbing.json").write_text(json.dumps(report, indent=1))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
