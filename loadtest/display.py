"""What the operator sees: a live rich table (or plain progress lines) during a run, then the report."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadtest.driver import BatchProgress, RunState
from loadtest.stats import Aggregate, Summary, aggregate, measured_elapsed

LIVE_REFRESH = 0.25
PLAIN_EVERY = 5.0


def fmt_seconds(value: float | None) -> str:
    """``850 ms``, ``1.25 s``; ``-`` for no value."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in errors.items()) or "none"


def snapshot(state: RunState, now: float | None = None) -> tuple[str, Aggregate, int]:
    """The run so far: its phase, the figures of its measured requests, and its warm-up count."""
    now = time.perf_counter() if now is None else now
    measured = state.measured()
    if state.finished is not None:
        phase = "done"
    elif now < state.measure_start:
        phase = "warm-up"
    elif state.is_open(now):
        phase = "measuring"
    else:
        phase = "draining"
    elapsed = measured_elapsed(measured, state.measure_start, state.started, now) if phase == "done" \
        else max(0.0, now - state.measure_start)
    return phase, aggregate(measured, elapsed), len(state.results) - len(measured)


def _remaining(state: RunState, now: float) -> str:
    parts = []
    if state.duration is not None:
        parts.append(fmt_seconds(max(0.0, state.measure_start + state.duration - now)))
    if state.requests is not None:
        parts.append(f"{max(0, state.requests - state.measured_sent)} req")
    return " / ".join(parts) or "-"


def live_view(state: RunState, title: str) -> RenderableType:
    """The live table: progress, throughput, errors and latency percentiles over the run so far."""
    now = time.perf_counter()
    phase, agg, warm = snapshot(state, now)
    progress = Table(title=title, title_justify="left", expand=False)
    for column in ("phase", "elapsed", "remaining", "req/s", "out tok/s", "in flight", "completed",
                   "errors", "warm-up"):
        progress.add_column(column, justify="right")
    progress.add_row(phase, fmt_seconds(now - state.started), _remaining(state, now),
                     f"{agg.requests_per_s:.2f}", f"{agg.output_tokens_per_s:.1f}", str(state.in_flight),
                     str(agg.completed), str(agg.failed), str(warm))
    dists = Table(expand=False)
    for column in ("metric", "p50", "p95", "p99", "count"):
        dists.add_column(column, justify="right")
    for name, summary in (("latency", agg.latency), ("TTFT", agg.ttft), ("ITL", agg.itl)):
        dists.add_row(name, *_cells(summary, ("p50", "p95", "p99")), str(summary.count if summary else 0))
    errors = Text(f"errors by kind: {_errors_text(agg.errors)}", style="red" if agg.errors else "dim")
    return Group(progress, dists, errors)


def _cells(summary: Summary | None, fields: tuple[str, ...]) -> list[str]:
    return [fmt_seconds(getattr(summary, f)) if summary else "-" for f in fields]


def progress_line(state: RunState) -> str:
    """One plain progress line, for logs (``--no-live``)."""
    now = time.perf_counter()
    phase, agg, warm = snapshot(state, now)
    p50 = {name: fmt_seconds(s.p50 if s else None) for name, s in (("lat", agg.latency), ("ttft", agg.ttft),
                                                                   ("itl", agg.itl))}
    return (f"[{now - state.started:7.1f}s] {phase:<9} completed {agg.completed} errors {agg.failed} "
            f"in-flight {state.in_flight} warm-up {warm} | {agg.requests_per_s:.2f} req/s "
            f"{agg.output_tokens_per_s:.1f} tok/s | p50 latency {p50['lat']} TTFT {p50['ttft']} "
            f"ITL {p50['itl']}")


def batch_view(progress: BatchProgress, title: str) -> RenderableType:
    """The live table of a batch being polled."""
    table = Table(title=title, title_justify="left")
    for column in ("status", "elapsed", "lines", "completed", "failed"):
        table.add_column(column, justify="right")
    table.add_row(progress.status, fmt_seconds(progress.elapsed), str(progress.lines),
                  str(progress.counts.get("completed", 0)), str(progress.counts.get("failed", 0)))
    return table


def batch_line(progress: BatchProgress) -> str:
    """One plain progress line for a batch."""
    return (f"[{progress.elapsed:7.1f}s] batch {progress.batch_id or '-'} {progress.status}: "
            f"{progress.counts.get('completed', 0)}/{progress.lines} completed, "
            f"{progress.counts.get('failed', 0)} failed")


async def _every(interval: float, action: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        action()


@contextlib.asynccontextmanager
async def showing(console: Console, live: bool, view: Callable[[], RenderableType],
                  line: Callable[[], str]) -> AsyncIterator[None]:
    """While the body runs: a live view refreshed 4 times a second, or a plain line every 5 s."""
    if live:
        with Live(view(), console=console, auto_refresh=False, transient=True) as screen:
            ticker = asyncio.create_task(_every(LIVE_REFRESH, lambda: screen.update(view(), refresh=True)))
            try:
                yield
            finally:
                ticker.cancel()
    else:
        ticker = asyncio.create_task(_every(PLAIN_EVERY, lambda: console.print(line(), highlight=False)))
        try:
            yield
        finally:
            ticker.cancel()


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def final_table(rep: dict[str, Any]) -> Group:
    """The final report as rich tables: what ran, counts and throughput, distributions, errors."""
    s = rep["settings"]
    head = Table(title=f"inferq loadtest report: {s['mode']} on {s['model']} at {s['base_url']}",
                 title_justify="left", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    if "batch" in rep:
        load = f"batch {rep['batch']['id']} ({rep['batch']['status']}) of {s['requests']} lines"
    elif s.get("rate"):
        load = f"rate {s['rate']}/s, at most {s['concurrency']} in flight"
    else:
        load = f"concurrency {s['concurrency']}"
    head.add_row("load", f"{load}; started {s['started_at']}")
    req = rep["requests"]
    head.add_row("requests", f"{req['completed']} completed, {req['failed']} failed "
                             f"in {rep['duration_s']:.1f} s (+{req['warmup']} warm-up)")
    head.add_row("tokens", ", ".join(f"{k} {v}" for k, v in rep["tokens"].items()))
    head.add_row("throughput", ", ".join(f"{k.replace('_per_s', '')}/s {v:.2f}"
                                         for k, v in rep["throughput"].items()))
    head.add_row("errors", _errors_text(rep["errors"]))
    if rep.get("interrupted"):
        head.add_row("note", "interrupted: the figures cover the requests finished before Ctrl-C")
    parts: list[RenderableType] = [head]
    if "latency_ms" in rep:
        dists = Table(title="milliseconds", title_justify="left")
        fields = ("p50", "p90", "p95", "p99", "mean", "max", "count")
        dists.add_column("metric")
        for f in fields:
            dists.add_column(f, justify="right")
        for name, key in (("latency", "latency_ms"), ("TTFT", "ttft_ms"), ("ITL", "itl_ms"),
                          ("queued", "queued_ms")):
            d = rep.get(key)
            if d is None and key == "queued_ms":
                continue
            if d is None:
                dists.add_row(name, *["-"] * len(fields))
            else:
                dists.add_row(name, *(str(d[f]) if f == "count" else _ms(d[f]) for f in fields))
        parts.append(dists)
    return Group(*parts)
