"""inferq vs vLLM's own OpenAI server: the same client, workload, engine arguments and environment,
both up at once and measured alternately (A B A B ...), with the CPU each side spends per token.

    python -m benchmarks.vs_vllm                                  # concurrency 1, 16 and 64, 3 pairs each
    python -m benchmarks.vs_vllm --levels 16,64 --pairs 3         # issue 12's levels
    python -m benchmarks.vs_vllm --levels 1 --pairs 1 --requests 4 --max-tokens 4 --warmup 0   # smoke

It starts vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with
exactly the argument list an inferq worker gives vLLM (:func:`workers.engine.server_argv`:
engine and serving options from ``config``, ``VLLM_EXTRA_ARGS`` included), and the inferq
stack (one worker, one API process) on a private ``redis-server`` and a private SQLite
database in a temporary directory. Both get the same ``VLLM_CPU_KVCACHE_SPACE``, set in both
child environments from one place; the script reads both processes' environments and
argument lists back (the worker's environment as it was started: Celery's process title
overwrites ``/proc/<pid>/environ``), prints them, and refuses to run if they differ.

Then, for each concurrency level, it alternates vLLM, inferq, vLLM, inferq ... for
``--pairs`` pairs. Each run is the ``inferq loadtest`` driver (closed loop, streaming chat,
``--warmup`` seconds of warm-up, then the measured requests, fixed prompt length and
``max_tokens`` with ``ignore_eos``). Around each run's measured part it reads the CPU time
(psutil) of every process: for vLLM the API server process and its engine core (with its
children) apart; for inferq the worker's main process, its engine core, the API processes
(gunicorn master and workers) and Redis. CPU per output token divides by the tokens the
client received in that window (the measured requests' tokens, plus those of warm-up
requests that arrived after it opened, estimated from their TTFT and mean ITL). The side
not being measured is idle; its CPU during the other's run is printed, so an engine that
busy-polls while idle shows.

Per level it prints each pair, the median and the spread (min..max) of every figure,
including the inferq/vLLM ratios and "worker CPU/token ÷ vLLM API server CPU/token", and
where each side's server process spends it, per thread (:mod:`benchmarks.thread_cpu`: vLLM's
loop, the delta publisher, Celery's consumer and task threads ...);
the last line of output is the result as one JSON object (``--json-out`` also writes
every run's full report). Run it from the repository root.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
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
from unittest import mock

import click
import httpx
import psutil
from rich.console import Console

from benchmarks import proc_cpu
from benchmarks.stack import BENCH_KEY, private_stack
from benchmarks.thread_cpu import ThreadWindow
from benchmarks.vs_vllm_report import (
    level_summary,
    level_table,
    pair_figures,
    pair_line,
    spread,
    thread_table,
)
from config import Settings, get_settings
from inferq.launcher import free_port
from loadtest import driver, stats
from loadtest.driver import DriverConfig, RequestResult, RunState
from loadtest.workload import Workload
from workers.engine import cpu_supports_bf16, server_argv

console = Console(width=max(shutil.get_terminal_size().columns, 160))
SIDES = ("vllm", "inferq")
#: Environment variables that can change what an engine does; printed for both sides.
ENGINE_ENV_PREFIXES = ("VLLM_", "OMP_", "KMP_", "MKL_", "TORCH", "PYTORCH_", "CUDA_", "HF_", "TRANSFORMERS_",
                       "TOKENIZERS_", "LD_PRELOAD", "MALLOC_")


# --- starting both sides ------------------------------------------------------------------------


def kv_cache_space(s: Settings) -> str:
    """The one ``VLLM_CPU_KVCACHE_SPACE`` both sides get: the exported value if any (the worker would
    keep it), else the setting."""
    return os.environ.get("VLLM_CPU_KVCACHE_SPACE") or str(s.kv_cache_space_gib)


def settings_for(env: dict[str, str]) -> Settings:
    """The settings a process with environment ``env`` (and this working directory) reads."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


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
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def vllm_server(argv: list[str], env: dict[str, str], workdir: Path
                ) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """Start vLLM's OpenAI server with ``argv`` (the worker's) in its own process group; yields the
    process, its base URL and its log at once (not waiting for it to be ready)."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv,
               "--host", "127.0.0.1", "--port", str(port)]
    log = workdir / "vllm-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        _stop(proc)


def process_env(pid: int, started_with: dict[str, str]) -> tuple[dict[str, str], str]:
    """The environment a process started with and where it was read: ``/proc/<pid>/environ``, or
    ``started_with`` (what this script gave it) where a process title has overwritten that (Celery's
    ``celeryd: ...`` title takes the memory the kernel reads the environment from)."""
    env = dict(psutil.Process(pid).environ())
    return (env, "/proc/<pid>/environ") if env else (started_with, "as started (title overwrote /proc)")


def engine_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(ENGINE_ENV_PREFIXES)}


def check_same_engine(vllm_proc: subprocess.Popen[bytes], vllm_argv: list[str], vllm_env: dict[str, str],
                      worker_pid: int, worker_env: dict[str, str], on_cpu: bool) -> dict[str, Any]:
    """What each side got, read back from the running processes: vLLM's argument list (from its command
    line) and the worker's (:func:`server_argv` of the settings its environment gives), and both
    environments' engine-related variables. Raises if the argument lists or those variables differ."""
    cmdline = psutil.Process(vllm_proc.pid).cmdline()
    start = cmdline.index("vllm.entrypoints.openai.api_server") + 1
    got_vllm = cmdline[start:]
    if got_vllm[-4:-2] == ["--host", "127.0.0.1"] and got_vllm[-2] == "--port":
        got_vllm = got_vllm[:-4]
    v_env, v_source = process_env(vllm_proc.pid, vllm_env)
    w_env, w_source = process_env(worker_pid, worker_env)
    got_worker = server_argv(settings_for(w_env), on_cpu)
    same_argv = got_vllm == got_worker == vllm_argv
    v_engine, w_engine = engine_env(v_env), engine_env(w_env)
    differing = sorted(k for k in set(v_env) | set(w_env) if v_env.get(k) != w_env.get(k))
    report = {"vllm_argv": got_vllm, "worker_argv": got_worker, "same_argv": same_argv,
              "vllm_engine_env": v_engine, "worker_engine_env": w_engine,
              "same_engine_env": v_engine == w_engine,
              "env_read_from": {"vllm": v_source, "worker": w_source},
              "other_env_differences": [k for k in differing if k not in v_engine and k not in w_engine]}
    console.print("[bold]engine arguments[/] (vLLM's server command line; the worker's server_argv from its "
                  f"environment): {'identical' if same_argv else '[red]DIFFERENT[/]'}")
    console.print(f"  vLLM server: {' '.join(got_vllm)}")
    console.print(f"  worker:      {' '.join(got_worker)}")
    console.print("[bold]engine environment[/]: "
                  f"{'identical' if report['same_engine_env'] else '[red]DIFFERENT[/]'}")
    console.print(f"  vLLM server ({v_source}): {v_engine}")
    console.print(f"  worker ({w_source}): {w_engine}")
    console.print("  other variables that differ (the stack's own settings): "
                  f"{report['other_env_differences']}")
    if not same_argv or not report["same_engine_env"]:
        raise click.ClickException("the two sides would not run the same engine (see above)")
    return report


def cpu_roots(vllm_pid: int, stack_pids: dict[str, int]) -> dict[str, list[proc_cpu.Root]]:
    """The processes whose CPU each side spends (this process, the client, is counted for both)."""
    me = os.getpid()
    return {
        "vllm": [proc_cpu.Root(vllm_pid, "vllm_api_server", "vllm_engine_core", "vllm_other")],
        "inferq": [proc_cpu.Root(stack_pids["worker"], "worker", "worker_engine_core", "worker_other"),
                   proc_cpu.Root(stack_pids["api"], "api"), proc_cpu.Root(stack_pids["redis"], "redis")],
        "client": [proc_cpu.Root(me, "client", tree=False)],  # its children are the servers
    }


def describe_roles(roots: dict[str, list[proc_cpu.Root]]) -> dict[str, list[str]]:
    """Print and return which processes each CPU role covers (pid and title)."""
    roles: dict[str, list[str]] = {}
    for pid, (role, _) in proc_cpu.snapshot([r for rs in roots.values() for r in rs]).items():
        try:
            name = proc_cpu.title(psutil.Process(pid))[:60]
        except psutil.Error:
            continue
        roles.setdefault(role, []).append(f"{pid} {name}")
    for role, procs in roles.items():
        console.print(f"  CPU role {role}: {', '.join(procs)}")
    return roles

# --- one measured run ---------------------------------------------------------------------------


def tokens_in_window(results: list[RequestResult], opened: float) -> int:
    """Output tokens the client received after ``opened`` (seconds since the run began): all of the
    measured requests', and the part of each warm-up request's that came after (its tokens taken as
    evenly spaced from its first token at its mean ITL)."""
    total = 0
    for r in results:
        if not r.ok or r.completion_tokens <= 0:
            continue
        first = r.start + (r.ttft if r.ttft is not None else r.latency)
        if not r.warmup or first >= opened:
            total += r.completion_tokens
        elif r.itl and r.start + r.latency > opened:
            total += max(0, r.completion_tokens - int((opened - first) / r.itl) - 1)
    return total


def run_once(base_url: str, model: str, concurrency: int, n_requests: int, opts: dict[str, Any],
             roots: dict[str, list[proc_cpu.Root]], thread_pid: int, on_tick: Callable[[str], None]
             ) -> dict[str, Any]:
    """One closed-loop run at ``concurrency``: warm-up, then ``n_requests`` measured, with the CPU of
    every process (both sides) read when the measured part opens and when the run ends, and that of
    each thread of ``thread_pid`` (the measured side's server process)."""
    config = DriverConfig(base_url=base_url + "/v1", api_key=BENCH_KEY, model=model, mode="chat-stream",
                          stream=True, concurrency=concurrency, requests=n_requests, warmup=opts["warmup"],
                          ignore_eos=True, temperature=1.0, timeout=opts["timeout"], seed=opts["seed"])
    workload = Workload(opts["prompt_words"], opts["max_tokens"], 0.0, opts["seed"])
    state = RunState(warmup=config.warmup, requests=n_requests)
    everything = [root for rs in roots.values() for root in rs]
    marks: dict[str, Any] = {}
    threads = ThreadWindow(thread_pid)

    async def go() -> None:
        async def ticker() -> None:
            while True:
                await asyncio.sleep(10)
                on_tick(f"    {len(state.measured())}/{n_requests} done, {state.in_flight} in flight")

        tick = asyncio.create_task(ticker())
        run = asyncio.create_task(driver.run(config, workload, state))
        try:
            await asyncio.sleep(0)  # run() has set state.started
            await asyncio.sleep(max(0.0, state.measure_start - time.perf_counter()))
            threads.open()
            marks["opened"], marks["before"] = time.perf_counter(), proc_cpu.snapshot(everything)
            await run
            marks["closed"], marks["after"] = time.perf_counter(), proc_cpu.snapshot(everything)
            marks["threads"] = threads.close()
        finally:
            tick.cancel()
            run.cancel()

    asyncio.run(go())
    measured = state.measured()
    elapsed = stats.measured_elapsed(measured, state.measure_start, state.started, time.perf_counter())
    settings = {"base_url": base_url, "model": model, "mode": config.mode, "concurrency": concurrency,
                "requests": n_requests, "ignore_eos": True, "temperature": 1.0, **opts}
    rep = stats.report(settings, stats.aggregate(measured, elapsed),
                       warmup_requests=len(state.results) - len(measured))
    window = marks["closed"] - marks["opened"]
    cpu = proc_cpu.delta(marks["before"], marks["after"])
    rep["cpu_window"] = {"seconds": round(window, 3),
                         "tokens": tokens_in_window(state.results, marks["opened"] - state.started),
                         "cpu_s": {role: round(v, 4) for role, v in sorted(cpu.items())},
                         "pids": proc_cpu.roles_of(marks["after"]),
                         "threads": {"pid": thread_pid, "cpu_s": marks["threads"]}}
    rep["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return rep


# --- figures ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where it ran: CPU model and count, BF16 support, memory, platform."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {**stats.machine_info(), "cpu_model": model, "cpu_bf16": cpu_supports_bf16(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}


# --- the command --------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--levels", default="1,16,64", show_default=True, help="Concurrency levels, comma separated.")
@click.option("--pairs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Alternating vLLM/inferq run pairs per level.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1),
              help="Measured requests per run (default: 4 x concurrency, at least 16).")
@click.option("--prompt-words", default=34, show_default=True,
              help="Prompt length in words: one token each for SmolLM2, whose chat template adds 30 tokens "
                   "(34 words: 64 prompt tokens).")
@click.option("--max-tokens", default=64, show_default=True, help="max_tokens, with ignore_eos.")
@click.option("--warmup", default=10.0, show_default=True,
              help="Warm-up seconds before each measured run, both sides (not counted).")
@click.option("--timeout", default=900.0, show_default=True, help="Per-request timeout, seconds.")
@click.option("--seed", default=0, show_default=True,
              help="Workload seed: both servers get the same prompts.")
@click.option("--ready-timeout", default=900.0, show_default=True,
              help="Seconds to wait for the servers to start.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the JSON here, with every run's full report.")
def main(levels: str, pairs: int, n_requests: int | None, prompt_words: int, max_tokens: int, warmup: float,
         timeout: float, seed: int, ready_timeout: float, json_out: Path | None) -> None:
    """Output tok/s, TTFT, ITL and CPU per token: inferq (one worker) vs vLLM's OpenAI server, same
    engine, both up, runs alternated."""
    s = get_settings()
    if not Path(s.model_name).exists():
        raise click.ClickException(f"{s.model_name} not found: run from the repo root after `make model`")
    concurrencies = [int(x) for x in levels.split(",") if x.strip()]
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    argv = server_argv(s, on_cpu)
    shared_env = {"VLLM_CPU_KVCACHE_SPACE": kv_cache_space(s)}  # the one place both sides' value comes from
    opts = {"prompt_words": prompt_words, "max_tokens": max_tokens, "warmup": warmup, "timeout": timeout,
            "seed": seed}
    started = datetime.now(UTC).isoformat(timespec="seconds")
    console.print(f"[bold]starting vLLM's server and the inferq stack[/] ({s.model_name}, "
                  f"vLLM {vllm_version}, {shared_env})")
    results: dict[int, list[dict[str, Any]]] = {}
    figures: dict[int, list[dict[str, float | None]]] = {}
    vllm_env = {**os.environ, **shared_env}
    with tempfile.TemporaryDirectory(prefix="inferq-vs-vllm-") as tmp, \
            vllm_server(argv, vllm_env, Path(tmp)) as (vproc, vbase, vlog):
        t0 = time.monotonic()
        with private_stack(None, ready_timeout, env={"ENGINE": "vllm", **shared_env}) as stack:
            wait_ready(f"{vbase}/health", ready_timeout, vproc, vlog)
            wait_ready(f"{vbase}/v1/models", 60, vproc, vlog)
            console.print(f"  both ready after {time.monotonic() - t0:.0f}s: vLLM at {vbase}, inferq at "
                          f"{stack.base}")
            same = check_same_engine(vproc, argv, vllm_env, stack.worker.pid, stack.env, on_cpu)
            roots = cpu_roots(vproc.pid, {"worker": stack.worker.pid, "api": stack.api.pid,
                                          "redis": stack.redis.pid})
            bases = {"vllm": vbase, "inferq": stack.base}
            servers = {"vllm": vproc.pid, "inferq": stack.worker.pid}  # their threads are read too
            measured = describe_roles(roots)
            for c in concurrencies:
                n = n_requests or max(16, 4 * c)
                results[c], figures[c] = [], []
                for pair in range(1, pairs + 1):
                    reps: dict[str, dict[str, Any]] = {}
                    for side in SIDES:  # A B: the other side is up and idle meanwhile
                        console.print(f"  c={c} pair {pair}: {side}")
                        reps[side] = run_once(bases[side], s.served_model_name, c, n, opts, roots,
                                              servers[side], console.print)
                    results[c].append(reps)
                    figures[c].append(f := pair_figures(reps["vllm"], reps["inferq"]))
                    console.print(pair_line(c, pair, f, reps["inferq"]["load_average_after"]))
    first = results[concurrencies[0]][0]["vllm"]
    prompt = first["tokens"]["prompt"] / max(1, first["requests"]["completed"])
    title = (f"inferq / vLLM server, {s.served_model_name}, {prompt:.0f} prompt tokens, {max_tokens} out "
             f"(ignore_eos), CPU µs per output token")
    out_levels: dict[str, Any] = {}
    for c in concurrencies:
        st = spread(figures[c])
        console.print(level_table(c, figures[c], st, title))
        console.print(thread_table(c, results[c]))
        for line in level_summary(c, figures[c], st):
            console.print(line)
        out_levels[str(c)] = {"requests": n_requests or max(16, 4 * c), "pairs": figures[c], "stats": st}
    result = {"started_at": started, "machine": machine(), "vllm_version": vllm_version,
              "engine": {"argv": argv, "env": shared_env, **same},
              "processes": measured, "workload": {**opts, "pairs": pairs},
              "levels": out_levels}
    if json_out is not None:
        full = {**result, "runs": {str(c): results[c] for c in concurrencies}}
        json_out.write_text(json.dumps(full, indent=2) + "\n")
        console.print(f"full JSON (every run's report) written to {json_out}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
