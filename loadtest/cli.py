"""``inferq loadtest``: drive load against an OpenAI-compatible server, show it live, report it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import httpx
from rich.console import Console

from loadtest import display, driver, stats
from loadtest.driver import MODES, BatchProgress, DriverConfig, RunState
from loadtest.workload import Workload, WorkloadError

DEFAULT_DURATION = 60.0
DEFAULT_BATCH_LINES = 100
DEFAULT_OPEN_LOOP_CAP = 512

EPILOG = """\b
Examples:
  inferq loadtest                                   # 16 streaming chats at a time for 60 s
  inferq loadtest --concurrency 64 --duration 300 --warmup 10 --ignore-eos
  inferq loadtest --rate 5 --duration 120           # Poisson arrivals, 5 requests/s
  inferq loadtest --mode completions --no-stream --requests 500 --json-out run.json
  inferq loadtest --prompts prompts.jsonl --requests 200 --no-live --fail-on-error
  inferq loadtest --mode batch --requests 1000 --max-tokens 32
  inferq loadtest --base-url http://gpu-box:8000/v1 --api-key sk-... --json > run.json

\b
Figures: latency is from sending a request to the end of its response; TTFT to the
first chunk with content; ITL = (latency - TTFT) / (completion tokens - 1), with the
tokens taken from the usage the server reports (stream_options.include_usage).
Percentiles cover successful requests only; errors are counted by kind: HTTP status
and OpenAI error code (e.g. "401 invalid_api_key"), "stream <code>" for an error
inside a stream, or the exception class (ConnectError, ReadTimeout) without a response.
"""


def clean_url(url: str) -> str:
    """The base URL without credentials, query or fragment (safe to record)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def default_api_key() -> str | None:
    """INFERQ_API_KEY, OPENAI_API_KEY, else the first of API_KEYS in the environment or ./.env."""
    for name in ("INFERQ_API_KEY", "OPENAI_API_KEY"):
        if os.environ.get(name):
            return os.environ[name]
    from config import get_settings

    keys = get_settings().bootstrap_keys
    return keys[0] if keys else None


def first_model(base_url: str, api_key: str) -> str:
    """The first model id of ``GET /models``."""
    try:
        resp = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {clean_url(base_url)}: {exc!r}") from exc
    if resp.status_code != 200:
        raise click.ClickException(f"GET /models: {driver.error_kind(resp.status_code, resp.json())} "
                                   "(pass --model, or check --api-key)")
    models = resp.json().get("data") or []
    if not models:
        raise click.ClickException("GET /models lists no model (no live worker?); pass --model")
    return str(models[0]["id"])


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(epilog=EPILOG, context_settings=CONTEXT)
@click.option("--base-url", default="http://localhost:8020/v1", show_default=True, envvar="INFERQ_BASE_URL",
              help="OpenAI-compatible base URL (with /v1); env INFERQ_BASE_URL.")
@click.option("--api-key", help="Bearer key. Default: env INFERQ_API_KEY or OPENAI_API_KEY, else the first "
                                "of API_KEYS in ./.env. Never written to the report.")
@click.option("--model", help="Model name. Default: the first id of GET /models.")
@click.option("--mode", type=click.Choice(MODES), default="chat-stream", show_default=True,
              help="chat-stream: streaming chat (TTFT, ITL); chat: buffered chat; completions: /completions "
                   "(see --stream); batch: one /batches job of --requests lines (lines/s, tokens/s).")
@click.option("--stream/--no-stream", default=None,
              help="Stream /completions responses (mode completions only; default: stream).")
@click.option("--concurrency", type=click.IntRange(min=1),
              help=f"Closed loop: this many requests in flight, each sent when one ends (default 16). With "
                   f"--rate: the cap on requests in flight (default {DEFAULT_OPEN_LOOP_CAP}).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Open loop: Poisson arrivals at this many requests/s, whatever the server's pace.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help=f"Seconds of measured load after the warm-up (default {DEFAULT_DURATION:.0f} unless "
                   "--requests is given); requests in flight at the end are awaited.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1),
              help=f"Measured requests to send (batch mode: lines, default {DEFAULT_BATCH_LINES}). With "
                   "--duration, whichever ends first.")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Synthetic prompt length: random common words, about one token each.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="max_tokens of each request (a --prompts line may set its own).")
@click.option("--length-jitter", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Draw each prompt length and max_tokens uniformly within ±this fraction.")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL of {"prompt": "..."} or {"messages": [...]} lines, optional "max_tokens"; '
                   "used in order, cycling. Replaces the synthetic prompts.")
@click.option("--warmup", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds of load first whose requests are not counted.")
@click.option("--ignore-eos", is_flag=True,
              help="Send ignore_eos: true (a vLLM extension) so every request generates max_tokens.")
@click.option("--temperature", type=click.FloatRange(0, 2),
              help="Sampling temperature (default: the server's).")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before one request (batch mode: the whole batch) counts as timed out.")
@click.option("--json", "json_stdout", is_flag=True,
              help="Print the JSON report on stdout (the display then goes to stderr).")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report to this file.")
@click.option("--live/--no-live", default=None,
              help="Live table refreshed 4 times a second, or a plain progress line every 5 s (for CI logs). "
                   "Default: live on a terminal.")
@click.option("--fail-on-error", is_flag=True, help="Exit with status 1 if any measured request failed.")
@click.option("--seed", type=int, help="Seed for prompts, lengths and arrivals (reproducible workload).")
@click.pass_context
def loadtest(ctx: click.Context, base_url: str, api_key: str | None, model: str | None, mode: driver.Mode,
             stream: bool | None, concurrency: int | None, rate: float | None, duration: float | None,
             n_requests: int | None, prompt_tokens: int, max_tokens: int, length_jitter: float,
             prompts_file: Path | None, warmup: float, ignore_eos: bool, temperature: float | None,
             timeout: float, json_stdout: bool, json_out: Path | None, live: bool | None, fail_on_error: bool,
             seed: int | None) -> None:
    """Load-test an OpenAI-compatible server (inferq, vLLM, ...): a live view, then a report.

    Sends chat or completion requests at a fixed concurrency (closed loop) or at a
    Poisson rate (open loop), measures each request's latency, time to first token
    (TTFT), inter-token latency (ITL) and tokens, shows throughput, errors and
    percentiles live, and ends with a report (rich table, and JSON with --json or
    --json-out) that records the settings and the machine.
    """
    if stream is not None and mode != "completions":
        raise click.UsageError("--stream/--no-stream applies to --mode completions (use chat or chat-stream)")
    api_key = api_key or default_api_key()
    if not api_key:
        raise click.UsageError("no API key: pass --api-key or set INFERQ_API_KEY (or API_KEYS in ./.env)")
    base_url = base_url.rstrip("/")
    try:
        workload = Workload(prompt_tokens, max_tokens, length_jitter, seed, prompts_file)
    except (WorkloadError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="--prompts") from exc
    if duration is None and n_requests is None and mode != "batch":
        duration = DEFAULT_DURATION
    config = DriverConfig(
        base_url=base_url, api_key=api_key, model=model or first_model(base_url, api_key), mode=mode,
        stream=mode == "chat-stream" or (mode == "completions" and stream is not False),
        concurrency=concurrency or (DEFAULT_OPEN_LOOP_CAP if rate else 16), rate=rate, duration=duration,
        requests=n_requests, warmup=warmup, ignore_eos=ignore_eos, temperature=temperature, timeout=timeout,
        seed=seed)
    settings = {
        "base_url": clean_url(base_url), "model": config.model, "mode": mode, "stream": config.stream,
        "concurrency": config.concurrency, "rate": rate, "duration": duration, "requests": n_requests,
        "warmup": warmup, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "length_jitter": length_jitter, "prompts_file": str(prompts_file) if prompts_file else None,
        "ignore_eos": ignore_eos, "temperature": temperature, "timeout": timeout, "seed": seed,
        "json": json_stdout, "json_out": str(json_out) if json_out else None, "live": live,
        "fail_on_error": fail_on_error, "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    console = Console(stderr=json_stdout, force_terminal=True if live else None)
    show_live = console.is_terminal if live is None else live
    title = f"inferq loadtest: {mode} on {config.model} at {settings['base_url']}"
    if mode == "batch":
        lines = n_requests or DEFAULT_BATCH_LINES
        rep = _run_batch(config, workload, lines, settings, console, show_live, title)
    else:
        rep = _run_requests(config, workload, settings, console, show_live, title)
    console.print(display.final_table(rep))
    text = json.dumps(rep, indent=2)
    if json_out is not None:
        json_out.write_text(text + "\n")
        console.print(f"JSON report written to {json_out}")
    if json_stdout:
        click.echo(text)
    if fail_on_error and rep["requests"]["failed"]:
        ctx.exit(1)


def _run_requests(config: DriverConfig, workload: Workload, settings: dict[str, Any], console: Console,
                  live: bool, title: str) -> dict[str, Any]:
    state = RunState(warmup=config.warmup, duration=config.duration, requests=config.requests)

    async def go() -> None:
        async with display.showing(console, live, lambda: display.live_view(state, title),
                                   lambda: display.progress_line(state)):
            await driver.run(config, workload, state)

    interrupted = _run_until_interrupted(go())
    measured = state.measured()
    elapsed = stats.measured_elapsed(measured, state.measure_start, state.started, time.perf_counter())
    return stats.report(settings, stats.aggregate(measured, elapsed),
                        warmup_requests=len(state.results) - len(measured), interrupted=interrupted)


def _run_batch(config: DriverConfig, workload: Workload, lines: int, settings: dict[str, Any],
               console: Console, live: bool, title: str) -> dict[str, Any]:
    progress = BatchProgress(lines=lines)

    async def go() -> None:
        async with display.showing(console, live, lambda: display.batch_view(progress, title),
                                   lambda: display.batch_line(progress)):
            await driver.run_batch(config, workload, progress)

    try:
        interrupted = _run_until_interrupted(go())
    except driver.BatchError as exc:
        raise click.ClickException(str(exc)) from exc
    rep = stats.batch_report({**settings, "requests": lines}, progress)
    rep["interrupted"] = interrupted
    return rep


def _run_until_interrupted(coro: Any) -> bool:
    """Run the coroutine; True if Ctrl-C stopped it (the figures then cover what finished)."""
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return True
    return False
