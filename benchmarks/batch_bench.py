"""Batch benchmark: a batch through /v1/batches vs the same prompts on vLLM offline,
alternated, and chat TTFT with and without a batch running.

    python -m benchmarks.batch_bench --lines 1000 --max-tokens 32 --batch-share 1.0 --pairs 3

Both sides are up at once for the whole run and measured in turn, stack then offline, for
``--pairs`` pairs (A B A B ...). Each run starts after 2 s of quiet; the side not being
measured sits idle, and its CPU over the other's run is printed (an idle engine that
busy-polls would show). Both loaded at once, rather than started in turn, so that neither
side pays an engine start or a cold cache inside a pair, and both have the same memory
and cores around them.

- The stack: a worker and the API as child processes on a private ``redis-server`` and a
  private temporary database and files directory (nothing kept between runs; refused if
  a live worker already serves the model on that Redis). A run is one batch of
  ``--lines`` completions (``max_tokens`` with ``ignore_eos``, temperature 1), timed from
  the ``POST /v1/batches`` to the first poll (every ``--poll`` seconds, printed as the
  resolution) that sees it completed.
- Offline: ``vllm.LLM.generate`` in this process on the same prompts, with the same
  sampling. Its engine is built from the very argument list the worker's engine is
  (:func:`workers.engine.server_argv`, ``VLLM_EXTRA_ARGS`` included, parsed by vLLM's own
  ``serve`` parser into ``EngineArgs``), with the same ``VLLM_CPU_KVCACHE_SPACE``; the
  script reads the worker's settings back from its environment, prints both argument
  lists and engine environments, and refuses to run if they differ.

Each pair gets its own prompts (the same on both sides), so prefix caching helps neither.
Both sides are warmed alike before the first pair: ``--warmup`` chat requests one after
the other (their TTFT on the stack, all but the first, is the idle TTFT), then a batch
of ``--warmup-lines`` lines. It prints each pair's tokens/s and ratio (stack / offline),
then the median and the spread (min..max); with ``--probe-lines`` > 0, a last, untimed
batch runs on the stack while 5 chat requests measure the TTFT during a batch. The last
line of output is the result as JSON. Two engines are loaded: with the default
``VLLM_CPU_KVCACHE_SPACE`` (4 GiB each) it needs about 11 GB of RAM; ``--env
VLLM_CPU_KVCACHE_SPACE=1`` (both sides) holds 16 sequences of this size with room to spare.

    python -m benchmarks.batch_bench --lines 8 --pairs 2 --no-offline \
        --env ENGINE=scripted --env SERVED_MODEL_NAME=x     # the stack alone, no model
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click
import httpx
from rich.console import Console

from benchmarks import proc_cpu
from benchmarks.stack import BENCH_KEY, PrivateStack, private_stack
from benchmarks.vs_vllm import engine_env, kv_cache_space, machine, settings_for
from benchmarks.vs_vllm_report import level_table, spread
from config import get_settings
from workers.engine import server_argv

console = Console(width=max(shutil.get_terminal_size().columns, 120))


def _prompts(n: int, tag: str) -> list[str]:
    return [f"Item {tag}.{i}: describe a city you would like to visit and why." for i in range(n)]


CHAT_PROBE: list[Any] = [{"role": "user", "content": "Say hello to the team."}]
PROBE_TOKENS = 8
SETTLE_S = 2.0


# --- the stack ----------------------------------------------------------------


def _ttft(client: httpx.Client, base: str, model: str) -> float:
    body = {"model": model, "max_tokens": PROBE_TOKENS, "stream": True, "messages": CHAT_PROBE}
    start = time.perf_counter()
    with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {BENCH_KEY}"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    return time.perf_counter() - start


def _probe(client: httpx.Client, base: str, model: str, during: list[float]) -> None:
    during.extend(_ttft(client, base, model) for _ in range(5))


def run_batch(client: httpx.Client, base: str, model: str, prompts: list[str], max_tokens: int, poll: float,
              during: list[float] | None = None) -> tuple[float, int]:
    """One batch of completions; seconds from its creation to the poll that sees it end, and its output
    tokens. With ``during``, 5 chat requests run once 20 lines are done and their TTFTs go there."""
    lines = [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": model, "prompt": p, "max_tokens": max_tokens, "ignore_eos": True,
                       "temperature": 1.0}}
             for i, p in enumerate(prompts)]
    data = ("\n".join(json.dumps(line) for line in lines)).encode()
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    file_id = client.post(f"{base}/v1/files", headers=headers, data={"purpose": "batch"},
                          files={"file": ("b.jsonl", io.BytesIO(data))}).json()["id"]
    start = time.perf_counter()
    batch = client.post(f"{base}/v1/batches", headers=headers, json={
        "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}).json()
    probes: threading.Thread | None = None
    while batch["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(poll)
        batch = client.get(f"{base}/v1/batches/{batch['id']}", headers=headers).json()
        done = batch["request_counts"]["completed"]
        if during is not None and probes is None and done >= min(20, len(lines) // 2):
            probes = threading.Thread(target=_probe, args=(client, base, model, during), daemon=True)
            probes.start()
    elapsed = time.perf_counter() - start
    if probes is not None:
        probes.join(120)
    if batch["status"] != "completed":
        raise click.ClickException(f"the batch ended {batch['status']}: {batch.get('errors')}")
    return elapsed, int(batch["usage"]["output_tokens"])


# --- offline ------------------------------------------------------------------


class Offline:
    """``vllm.LLM`` in this process, its engine built from ``argv`` (the worker's ``vllm serve`` arguments)
    as the worker builds its own: vLLM's ``serve`` parser, then ``EngineArgs.from_cli_args``."""

    def __init__(self, argv: list[str]):
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        validate_parsed_serve_args(args)
        self.llm = LLM.from_engine_args(EngineArgs.from_cli_args(args))

    def chat(self) -> None:
        from vllm import SamplingParams

        self.llm.chat(CHAT_PROBE, SamplingParams(max_tokens=PROBE_TOKENS), use_tqdm=False)

    def generate(self, prompts: list[str], max_tokens: int) -> tuple[float, int]:
        """The prompts with the sampling the stack's lines get: the model's default sampling (as vLLM's
        server applies it) with the line's ``max_tokens``, ``ignore_eos`` and temperature."""
        from vllm import SamplingParams

        defaults = self.llm.model_config.get_diff_sampling_param()
        params = SamplingParams.from_optional(**{**defaults, "max_tokens": max_tokens, "ignore_eos": True,
                                                 "temperature": 1.0})
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # else the engine core outlives the script


# --- the two sides' engines ---------------------------------------------------


def same_engine(argv: list[str], stack: PrivateStack, on_cpu: bool) -> dict[str, Any]:
    """Print what each side's engine gets (the argument list and the engine-related environment variables;
    the worker's read back from the environment it was started with) and raise if they differ."""
    worker_argv = server_argv(settings_for(stack.env), on_cpu)
    mine, worker = engine_env(dict(os.environ)), engine_env(stack.env)
    same = worker_argv == argv and mine == worker
    verdict = "identical" if same else "[red]DIFFERENT[/]"
    console.print(f"[bold]engine arguments[/] (vllm serve syntax): {verdict}")
    console.print(f"  offline: {' '.join(argv)}\n  worker:  {' '.join(worker_argv)}")
    console.print(f"  engine environment: offline {mine}\n                      worker  {worker}")
    if not same:
        raise click.ClickException("the two sides would not run the same engine (see above)")
    return {"argv": argv, "worker_argv": worker_argv, "env": mine, "worker_env": worker, "same": same}


def cpu_roots(stack: PrivateStack) -> dict[str, list[proc_cpu.Root]]:
    """The processes of each side: the stack's worker (and its engine), API, coordinator and Redis; offline,
    the engine processes under this one (this process itself is the client of both)."""
    return {"stack": [proc_cpu.Root(stack.worker.pid, "worker", "worker_engine_core", "worker_other"),
                      proc_cpu.Root(stack.api.pid, "api"),
                      proc_cpu.Root(stack.coordinator.pid, "coordinator"),
                      proc_cpu.Root(stack.redis.pid, "redis")],
            "offline": [proc_cpu.Root(os.getpid(), "client", "offline_engine_core", "client")]}


#: The roles of each side's processes (:func:`cpu_roots`).
SIDE_ROLES = {"stack": ("worker", "worker_engine_core", "worker_other", "api", "coordinator", "redis"),
              "offline": ("offline_engine_core", "client")}


def measured(roots: dict[str, list[proc_cpu.Root]], side: str, run: Callable[..., tuple[float, int]],
             *args: Any) -> tuple[tuple[float, int], float, dict[str, float]]:
    """``run(*args)``'s (seconds, tokens), the CPU the *other* side used meanwhile, in % of a core, and the
    measured side's own CPU per role (% of a core); after ``SETTLE_S`` seconds of quiet, so that the side
    measured before has stopped (OpenMP threads spin on)."""
    time.sleep(SETTLE_S)
    every = [r for rs in roots.values() for r in rs]  # the stack's trees first: they claim their pids
    before, start = proc_cpu.snapshot(every), time.perf_counter()
    result = run(*args)
    cpu, seconds = proc_cpu.delta(before, proc_cpu.snapshot(every)), time.perf_counter() - start
    idle_roles = {"offline_engine_core"} if side == "stack" else set(SIDE_ROLES["stack"])
    own = {role: cpu.get(role, 0.0) / seconds * 100 for role in SIDE_ROLES[side]}
    return result, sum(cpu.get(role, 0.0) for role in idle_roles) / seconds * 100, own


# --- the run ------------------------------------------------------------------


def pair_figures(stack: tuple[float, int], offline: tuple[float, int] | None, idle: dict[str, float],
                 load: float, own: dict[str, float]) -> dict[str, float | None]:
    """One (stack run, offline run) pair: tokens/s, seconds, the ratio, the idle side's CPU."""
    stack_tokens_per_s = stack[1] / stack[0]
    offline_tokens_per_s = offline[1] / offline[0] if offline else None
    figs: dict[str, float | None] = {
        "stack_tokens_per_s": stack_tokens_per_s, "offline_tokens_per_s": offline_tokens_per_s,
        "stack_seconds": stack[0], "offline_seconds": offline[0] if offline else None,
        "ratio_tokens_per_s": stack_tokens_per_s / offline_tokens_per_s if offline_tokens_per_s else None}
    figs["idle_offline_cpu_pct"] = idle.get("offline")  # the offline engine while the stack ran
    figs["idle_stack_cpu_pct"] = idle.get("stack")
    figs["load_average_1m"] = load
    figs.update({f"cpu_pct_{role}": pct for role, pct in own.items()})  # each side's own run
    return figs


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def pair_line(pair: int, f: dict[str, float | None], poll: float) -> str:
    return (f"pair {pair}: stack {_f(f['stack_tokens_per_s'])} tok/s ({_f(f['stack_seconds'])} s, polled "
            f"every {poll} s), offline {_f(f['offline_tokens_per_s'])} tok/s ({_f(f['offline_seconds'])} s), "
            f"ratio {_f(f['ratio_tokens_per_s'], '{:.3f}')}; idle side's CPU: offline "
            f"{_f(f['idle_offline_cpu_pct'])} %, stack {_f(f['idle_stack_cpu_pct'])} % of a core; "
            f"load {_f(f['load_average_1m'], '{:.2f}')}; CPU % of a core during its own run: "
            + ", ".join(f"{role} {_f(f.get(f'cpu_pct_{role}'))}" for roles in SIDE_ROLES.values()
                        for role in roles))


@dataclass
class Run:
    """What the run measures, on both sides."""

    lines: int
    max_tokens: int
    pairs: int
    warmup: int
    warmup_lines: int
    poll: float
    probe_lines: int
    idle_ttft: list[float] = field(default_factory=list)
    during_ttft: list[float] = field(default_factory=list)
    figures: list[dict[str, float | None]] = field(default_factory=list)

    def warm_up(self, client: httpx.Client, base: str, model: str, offline: Offline | None) -> None:
        """Both sides alike: the chat requests one after the other, then a small batch."""
        console.print(f"warm-up, both sides: {self.warmup} chat requests, a batch of {self.warmup_lines} "
                      "lines")
        self.idle_ttft = [_ttft(client, base, model) for _ in range(self.warmup)][1:]
        prompts = _prompts(self.warmup_lines, "w")
        if self.warmup_lines:
            run_batch(client, base, model, prompts, self.max_tokens, self.poll)
        if offline is not None:
            for _ in range(self.warmup):
                offline.chat()
            if self.warmup_lines:
                offline.generate(prompts, self.max_tokens)

    def alternate(self, client: httpx.Client, base: str, model: str, offline: Offline | None,
                  roots: dict[str, list[proc_cpu.Root]]) -> None:
        """Stack, offline, stack, offline ...: each pair on its own prompts, the same on both sides."""
        for pair in range(1, self.pairs + 1):
            prompts, idle = _prompts(self.lines, str(pair)), {}
            stack, idle["offline"], own = measured(roots, "stack", run_batch, client, base, model, prompts,
                                                   self.max_tokens, self.poll)
            off = None
            if offline is None:
                del idle["offline"]  # no offline engine to be idle
            else:
                off, idle["stack"], offline_own = measured(roots, "offline", offline.generate, prompts,
                                                           self.max_tokens)
                own.update(offline_own)
            self.figures.append(f := pair_figures(stack, off, idle, os.getloadavg()[0], own))
            console.print(pair_line(pair, f, self.poll))
        if self.probe_lines:
            run_batch(client, base, model, _prompts(self.probe_lines, "p"), self.max_tokens, self.poll,
                      self.during_ttft)

    def report(self, batch_share: float) -> dict[str, dict[str, float] | None]:
        """Print the pairs, their median and spread, and the chat TTFTs; the figures' spread."""
        stats = spread(self.figures)
        table = level_table(0, self.figures, stats, "")
        table.title = (f"{self.lines} lines x {self.max_tokens} tokens, BATCH_SHARE={batch_share}: inferq "
                       "/v1/batches (stack) vs vLLM offline LLM.generate, alternated")
        console.print(table)
        if ratio := stats["ratio_tokens_per_s"]:
            pairs = ", ".join(_f(f["ratio_tokens_per_s"], "{:.3f}") for f in self.figures)
            console.print(f"ratio stack / offline: pairs {pairs}; median {ratio['median']:.3f}, "
                          f"spread {ratio['min']:.3f}..{ratio['max']:.3f}")
        if self.idle_ttft:
            console.print(f"chat TTFT p50 idle {statistics.median(self.idle_ttft) * 1000:.0f} ms")
        if self.during_ttft:
            console.print(f"chat TTFT p50 during a batch {statistics.median(self.during_ttft) * 1000:.0f} ms "
                          f"(samples: {[round(x * 1000) for x in self.during_ttft]})")
        elif self.probe_lines:
            console.print("no TTFT sample during the batch (it ended too soon)")
        return stats


@click.command()
@click.option("--lines", default=1000, show_default=True)
@click.option("--max-tokens", default=32, show_default=True)
@click.option("--batch-share", default=1.0, show_default=True,
              help="BATCH_SHARE for the worker (1.0 measures the stack's overhead alone).")
@click.option("--pairs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Alternating stack/offline run pairs.")
@click.option("--warmup", default=6, show_default=True, type=click.IntRange(min=1),
              help="Chat requests before the first pair, both sides (all but the first give the idle TTFT).")
@click.option("--warmup-lines", default=32, show_default=True, type=click.IntRange(min=0),
              help="Lines of a warm-up batch before the first pair, both sides.")
@click.option("--poll", default=0.1, show_default=True, help="Seconds between two polls of the batch.")
@click.option("--probe-lines", default=200, show_default=True,
              help="Lines of a last, untimed batch during which chat TTFT is measured (0: skip).")
@click.option("--offline/--no-offline", default=True, show_default=True,
              help="Run the vLLM offline side (needs the real engine); without it, the stack runs alone.")
@click.option("--port", type=int, help="Port for the API (default: a free one).")
@click.option("--env", "extra_env", multiple=True, metavar="NAME=VALUE", help="A setting for worker and API.")
def main(lines: int, max_tokens: int, batch_share: float, pairs: int, warmup: int, warmup_lines: int,
         poll: float, probe_lines: int, offline: bool, port: int | None, extra_env: tuple[str, ...]) -> None:
    """Batch throughput through inferq vs vLLM offline, alternated; chat TTFT with and without a batch."""
    overrides = dict(item.split("=", 1) for item in extra_env)
    os.environ.update(overrides)  # this process's settings (the offline engine's) are the worker's
    get_settings.cache_clear()
    s = get_settings()
    kv = kv_cache_space(s)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv  # one value for the worker's engine and the offline one
    started = datetime.now(UTC).isoformat(timespec="seconds")
    argv: list[str] = []
    on_cpu = False
    if s.engine == "vllm":
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        argv = server_argv(s, on_cpu)
    elif offline:
        raise click.ClickException(f"the offline side needs ENGINE=vllm (got {s.engine}); add --no-offline")
    run = Run(lines, max_tokens, pairs, warmup, warmup_lines, poll, probe_lines)
    engine: dict[str, Any] = {"engine": s.engine, "argv": argv}
    side: Offline | None = None
    client = httpx.Client(timeout=600)
    try:
        if offline:
            console.print("[bold]starting the offline engine in this process[/]")
            side = Offline(argv)
        console.print("[bold]starting the stack (worker + API) on a private Redis[/]")
        env = {**overrides, "BATCH_SHARE": str(batch_share), "VLLM_CPU_KVCACHE_SPACE": kv}
        with private_stack(port, 900, env=env) as stack:
            if s.engine == "vllm":
                engine = {"engine": s.engine, **same_engine(argv, stack, on_cpu)}
            run.warm_up(client, stack.base, s.served_model_name, side)
            run.alternate(client, stack.base, s.served_model_name, side, cpu_roots(stack))
    finally:
        if side is not None:
            side.shutdown()
    stats = run.report(batch_share)
    load = [round(x, 2) for x in os.getloadavg()]
    console.print(f"load average at the end: {load}")
    print(json.dumps({
        "started_at": started, "machine": machine(), "load_average_end": load,
        "settings": {"lines": lines, "max_tokens": max_tokens, "batch_share": batch_share, "pairs": pairs,
                     "warmup": warmup, "warmup_lines": warmup_lines, "poll_s": poll,
                     "probe_lines": probe_lines, "offline": offline, "env": overrides,
                     "VLLM_CPU_KVCACHE_SPACE": kv},
        "engine": engine, "pairs": run.figures, "stats": stats,
        "ttft_idle_ms": [round(x * 1000, 1) for x in run.idle_ttft],
        "ttft_during_batch_ms": [round(x * 1000, 1) for x in run.during_ttft]}), flush=True)


if __name__ == "__main__":
    main()
