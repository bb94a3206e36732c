"""Figures from measured requests: percentiles, throughput, errors by kind, and the JSON report."""

from __future__ import annotations

import math
import os
import platform
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.driver import BatchProgress, RequestResult

QUANTILES = (50, 90, 95, 99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, interpolated linearly between ranks
    (numpy's default method)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    rank = (len(sorted_values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Distribution of one metric, in seconds."""

    count: int
    mean: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float

    def as_ms(self) -> dict[str, float | int]:
        """The summary in milliseconds, rounded to microseconds, for the JSON report."""
        fields = {"p50": self.p50, "p90": self.p90, "p95": self.p95, "p99": self.p99, "mean": self.mean,
                  "max": self.max}
        return {"count": self.count, **{k: round(v * 1000, 3) for k, v in fields.items()}}


def summarize(values: Iterable[float]) -> Summary | None:
    """Percentiles, mean and max of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    p50, p90, p95, p99 = (percentile(ordered, q) for q in QUANTILES)
    return Summary(count=len(ordered), mean=sum(ordered) / len(ordered), max=ordered[-1],
                   p50=p50, p90=p90, p95=p95, p99=p99)


@dataclass(frozen=True)
class Aggregate:
    """The figures of a set of measured requests over ``elapsed`` seconds."""

    elapsed: float
    completed: int
    failed: int
    errors: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    requested_tokens: int
    latency: Summary | None
    ttft: Summary | None
    itl: Summary | None
    queued: Summary | None

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.elapsed if self.elapsed > 0 else 0.0


def aggregate(results: Sequence[RequestResult], elapsed: float) -> Aggregate:
    """Counts, token totals and distributions; only successful requests enter the distributions."""
    ok = [r for r in results if r.ok]
    return Aggregate(
        elapsed=elapsed,
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=dict(Counter(r.error for r in results if r.error is not None).most_common()),
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        completion_tokens=sum(r.completion_tokens for r in ok),
        requested_tokens=sum(r.max_tokens for r in ok),
        latency=summarize(r.latency for r in ok),
        ttft=summarize(r.ttft for r in ok if r.ttft is not None),
        itl=summarize(itl for r in ok if (itl := r.itl) is not None),
        queued=summarize(r.queued for r in ok),
    )


def measured_elapsed(results: Sequence[RequestResult], measure_start: float, started: float,
                     now: float) -> float:
    """Seconds from the end of the warm-up to the end of the last measured request (or ``now``)."""
    ends = [started + r.start + r.latency for r in results]
    end = max(ends) if ends else now
    return max(0.0, end - measure_start)


def machine_info() -> dict[str, Any]:
    """Where the client ran: CPU count, platform, Python."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version()}


def _summary(s: Summary | None) -> dict[str, float | int] | None:
    return s.as_ms() if s is not None else None


def report(settings: dict[str, Any], agg: Aggregate, *, warmup_requests: int, interrupted: bool = False
           ) -> dict[str, Any]:
    """The JSON report of a request run: settings, counts, throughput, latency distributions, errors."""
    return {
        "settings": settings,
        "machine": machine_info(),
        "interrupted": interrupted,
        "duration_s": round(agg.elapsed, 3),
        "requests": {"completed": agg.completed, "failed": agg.failed, "total": agg.completed + agg.failed,
                     "warmup": warmup_requests},
        "tokens": {"prompt": agg.prompt_tokens, "completion": agg.completion_tokens,
                   "completion_requested": agg.requested_tokens},
        "throughput": {"requests_per_s": round(agg.requests_per_s, 3),
                       "output_tokens_per_s": round(agg.output_tokens_per_s, 3),
                       "total_tokens_per_s": round(agg.total_tokens_per_s, 3)},
        "latency_ms": _summary(agg.latency),
        "ttft_ms": _summary(agg.ttft),
        "itl_ms": _summary(agg.itl),
        "queued_ms": _summary(agg.queued) if settings.get("rate") else None,
        "errors": agg.errors,
    }


def batch_report(settings: dict[str, Any], progress: BatchProgress) -> dict[str, Any]:
    """The JSON report of a batch run: lines and tokens per second from creation to the end."""
    elapsed = progress.elapsed
    completed = int(progress.counts.get("completed", 0))
    failed = int(progress.counts.get("failed", 0))

    def per_s(n: int) -> float:
        return round(n / elapsed, 3) if elapsed > 0 else 0.0

    return {
        "settings": settings,
        "machine": machine_info(),
        "batch": {"id": progress.batch_id, "status": progress.status},
        "duration_s": round(elapsed, 3),
        "requests": {"completed": completed, "failed": failed, "total": progress.lines, "warmup": 0},
        "tokens": {"prompt": progress.prompt_tokens, "completion": progress.completion_tokens},
        "throughput": {"lines_per_s": per_s(completed),
                       "output_tokens_per_s": per_s(progress.completion_tokens),
                       "total_tokens_per_s": per_s(progress.prompt_tokens + progress.completion_tokens)},
        "errors": dict(progress.errors),
    }
