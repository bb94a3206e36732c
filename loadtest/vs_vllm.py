"""inferq vs vLLM's own OpenAI server: the same client, workload and engine settings, one after the other.

    python -m loadtest.vs_vllm                       # concurrency 1, 16 and 64
    python -m loadtest.vs_vllm --levels 1,4 --requests 8 --warmup 2   # a quick smoke run

In one run on this machine it starts vLLM's OpenAI server
(``python -m vllm.entrypoints.openai.api_server``) with exactly the arguments an
inferq worker gives vLLM (:func:`workers.engine.server_argv`: engine and serving
options from ``config.get_settings()``, ``VLLM_EXTRA_ARGS`` included) and its
``VLLM_CPU_KVCACHE_SPACE``,
drives it with the ``inferq loadtest`` driver at each concurrency (closed loop,
streaming, a warm-up first, fixed prompt length and ``max_tokens`` with ``ignore_eos``),
stops it, then does the same against inferq with one worker (a private
``redis-server``, one worker and one API process). The two never run at once. It prints
output tokens/s, requests/s, TTFT and ITL p50/p99 of both and the inferq/vLLM ratios
as a table, and JSON with ``--json-out``. Run it from the repository root.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from config import Settings, get_settings
from loadtest import driver, stats
from loadtest.driver import DriverConfig, RunState
from loadtest.stack import BENCH_KEY, free_port, redis_server, running_stack
from loadtest.workload import Workload
from workers.engine import engine_args, server_argv

console = Console()
ENGINES = ("vllm", "inferq")
#: (label, where in a level's report, higher is better)
METRICS: tuple[tuple[str, tuple[str, str], bool], ...] = (
    ("output tok/s", ("throughput", "output_tokens_per_s"), True),
    ("req/s", ("throughput", "requests_per_s"), True),
    ("TTFT p50 ms", ("ttft_ms", "p50"), False),
    ("TTFT p99 ms", ("ttft_ms", "p99"), False),
    ("ITL p50 ms", ("itl_ms", "p50"), False),
    ("ITL p99 ms", ("itl_ms", "p99"), False),
)


def engine_settings(s: Settings, on_cpu: bool) -> dict[str, Any]:
    """What the inferq worker gives vLLM: its ``vllm serve`` arguments (:func:`workers.engine.server_argv`,
    which the worker parses with vLLM's own parser), ``VLLM_CPU_KVCACHE_SPACE`` as the worker sets it, and
    the vLLM version."""
    import vllm

    return {"argv": server_argv(s, on_cpu),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(s.kv_cache_space_gib)),
            "vllm_version": vllm.__version__}


def wait_ready(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log tail:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s; log tail:\n{_tail(log)}")


def _tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def vllm_server(engine: dict[str, Any], workdir: Path, ready_timeout: float) -> Iterator[str]:
    """vLLM's OpenAI server with ``engine`` settings (the worker's arguments), in its own process group;
    yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *engine["argv"],
            "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": engine["VLLM_CPU_KVCACHE_SPACE"]}
    log = workdir / "vllm-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", ready_timeout, proc, log)
        wait_ready(f"http://127.0.0.1:{port}/v1/models", 60, proc, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


@contextmanager
def inferq_stack(workdir: Path, ready_timeout: float) -> Iterator[str]:
    """A private redis-server, then one inferq worker and one API process on it; yields the base URL."""
    with redis_server() as redis_url, running_stack(
            free_port(), ready_timeout, REDIS_URL=redis_url, DATABASE_URL=f"sqlite:///{workdir}/bench.db",
            FILES_DIR=str(workdir / "files")) as base:
        yield base + "/v1"


def run_level(base_url: str, model: str, concurrency: int, n_requests: int, opts: dict[str, Any],
              on_tick: Callable[[str], None]) -> dict[str, Any]:
    """One closed-loop run at ``concurrency``: warm-up, then ``n_requests`` measured; its report."""
    config = DriverConfig(base_url=base_url, api_key=BENCH_KEY, model=model, mode="chat-stream",
                          stream=True, concurrency=concurrency, requests=n_requests, warmup=opts["warmup"],
                          ignore_eos=True, temperature=1.0, timeout=opts["timeout"], seed=opts["seed"])
    workload = Workload(opts["prompt_words"], opts["max_tokens"], 0.0, opts["seed"])
    state = RunState(warmup=config.warmup, requests=n_requests)

    async def go() -> None:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(10)
                on_tick(f"  c={concurrency}: {len(state.measured())}/{n_requests} done, "
                        f"{state.in_flight} in flight")

        tick = asyncio.create_task(ticker())
        try:
            await driver.run(config, workload, state)
        finally:
            tick.cancel()

    asyncio.run(go())
    measured = state.measured()
    elapsed = stats.measured_elapsed(measured, state.measure_start, state.started, time.perf_counter())
    settings = {"base_url": base_url, "model": model, "mode": config.mode, "concurrency": concurrency,
                "requests": n_requests, "ignore_eos": True, "temperature": 1.0, **opts}
    return stats.report(settings, stats.aggregate(measured, elapsed),
                        warmup_requests=len(state.results) - len(measured))


def _get(rep: dict[str, Any], where: tuple[str, str]) -> float | None:
    section = rep.get(where[0])
    return None if section is None else section.get(where[1])


def comparison(results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per concurrency and metric: both values and inferq / vLLM."""
    rows = []
    for level in sorted(results["vllm"]):
        for label, where, higher_better in METRICS:
            v, q = _get(results["vllm"][level], where), _get(results["inferq"][level], where)
            ratio = round(q / v, 3) if v and q is not None else None
            rows.append({"concurrency": level, "metric": label, "vllm": v, "inferq": q, "ratio": ratio,
                         "higher_is_better": higher_better})
    return rows


def comparison_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The comparison as a rich table."""
    table = Table(title=title, title_justify="left")
    for column in ("concurrency", "metric", "vLLM server", "inferq", "inferq / vLLM"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    previous = None
    for row in rows:
        spec = ".3f" if row["metric"] == "req/s" else ".1f"
        table.add_row(str(row["concurrency"]) if row["concurrency"] != previous else "", row["metric"],
                      _num(row["vllm"], spec), _num(row["inferq"], spec), _num(row["ratio"], ".3f"),
                      end_section=row["metric"] == METRICS[-1][0])
        previous = row["concurrency"]
    return table


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--levels", default="1,16,64", show_default=True, help="Concurrency levels, comma separated.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1),
              help="Measured requests per level (default: 4 x concurrency, at least 16).")
@click.option("--prompt-words", default=34, show_default=True,
              help="Prompt length in words: one token each for SmolLM2, whose chat template adds 30 tokens "
                   "(34 words: 64 prompt tokens).")
@click.option("--max-tokens", default=64, show_default=True, help="max_tokens, with ignore_eos.")
@click.option("--warmup", default=10.0, show_default=True,
              help="Warm-up seconds at each level (not counted).")
@click.option("--timeout", default=900.0, show_default=True, help="Per-request timeout, seconds.")
@click.option("--seed", default=0, show_default=True,
              help="Workload seed: both servers get the same prompts.")
@click.option("--ready-timeout", default=900.0, show_default=True,
              help="Seconds to wait for a server to start.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON here.")
def main(levels: str, n_requests: int | None, prompt_words: int, max_tokens: int, warmup: float,
         timeout: float, seed: int, ready_timeout: float, json_out: Path | None) -> None:
    """Output tok/s, req/s, TTFT and ITL: inferq (one worker) vs vLLM's OpenAI server, same engine.

    Starts vLLM's server, runs every level, stops it, then does the same with inferq.
    """
    s = get_settings()
    if not Path(s.model_name).exists():
        raise click.ClickException(f"{s.model_name} not found: run from the repo root after `make model`")
    concurrencies = [int(x) for x in levels.split(",") if x.strip()]
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    engine = engine_settings(s, on_cpu)
    resolved = engine_args(s, on_cpu)  # for the progress lines: the worker's resolved dtype, eager mode
    opts = {"prompt_words": prompt_words, "max_tokens": max_tokens, "warmup": warmup, "timeout": timeout,
            "seed": seed}
    results: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in ENGINES}
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="inferq-vs-vllm-") as tmp:
        for name in ENGINES:
            workdir = Path(tmp) / name
            workdir.mkdir()
            console.print(f"[bold]starting {name}[/] ({resolved['model']}, dtype {resolved['dtype']}, "
                          f"max_num_seqs {resolved['max_num_seqs']})")
            server = vllm_server(engine, workdir, ready_timeout) if name == "vllm" \
                else inferq_stack(workdir, ready_timeout)
            t0 = time.monotonic()
            with server as base:
                console.print(f"  ready in {time.monotonic() - t0:.0f}s at {base}")
                for c in concurrencies:
                    n = n_requests or max(16, 4 * c)
                    rep = run_level(base, s.served_model_name, c, n, opts, console.print)
                    rep["load_average_after"] = [round(x, 2) for x in os.getloadavg()]  # others on the box?
                    results[name][c] = rep
                    tok_s = rep["throughput"]["output_tokens_per_s"]
                    console.print(f"  c={c}: {rep['requests']}, {tok_s:.1f} tok/s, "
                                  f"errors {rep['errors'] or 'none'}, load {rep['load_average_after']}")
    rows = comparison(results)
    first = next(iter(results["vllm"].values()), {})
    per_request = first["tokens"]["prompt"] / max(1, first["requests"]["completed"]) if first else 0
    console.print(comparison_table(rows, f"inferq vs vLLM server: {s.served_model_name}, "
                                         f"{per_request:.0f} prompt tokens, {max_tokens} tokens, ignore_eos"))
    runs = {name: {str(c): r for c, r in by.items()} for name, by in results.items()}
    out = {"started_at": started, "machine": stats.machine_info(), "engine": engine, "workload": opts,
           "comparison": rows, "runs": runs}
    click.echo(json.dumps({"engine": engine, "workload": opts, "comparison": rows}, indent=2))
    if json_out is not None:
        json_out.write_text(json.dumps(out, indent=2) + "\n")
        console.print(f"full JSON (settings, machine, every run's report) written to {json_out}")


if __name__ == "__main__":
    main()
