"""The figures of ``benchmarks.vs_vllm``: one (vLLM run, inferq run) pair as flat figures, their
median and spread over the pairs, and the tables and lines that print them."""

from __future__ import annotations

import statistics
from typing import Any

from rich.table import Table

#: (key, where in a run's report): the request figures compared as inferq / vLLM.
METRICS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("output_tok_s", ("throughput", "output_tokens_per_s")),
    ("req_s", ("throughput", "requests_per_s")),
    ("ttft_p50_ms", ("ttft_ms", "p50")),
    ("ttft_p99_ms", ("ttft_ms", "p99")),
    ("itl_p50_ms", ("itl_ms", "p50")),
    ("itl_p99_ms", ("itl_ms", "p99")),
)
#: CPU roles of each side (see :func:`cpu_roots`).
ROLES = {"vllm": ("vllm_api_server", "vllm_engine_core", "vllm_other", "client"),
         "inferq": ("worker", "worker_engine_core", "worker_other", "api", "redis", "client")}
CPU_RATIO = "cpu_ratio_worker_vs_vllm_api"
LABELS = {
    CPU_RATIO: "worker CPU/token ÷ vLLM API server CPU/token",
    "cpu_ratio_stack_vs_vllm_api": "(worker + API + Redis) CPU/token ÷ vLLM API server CPU/token",
    "cpu_ratio_engine_core": "inferq engine core ÷ vLLM engine core, CPU/token",
}


def _get(rep: dict[str, Any], where: tuple[str, str]) -> float | None:
    section = rep.get(where[0])
    value = None if section is None else section.get(where[1])
    return None if value is None else float(value)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def pair_figures(v: dict[str, Any], q: dict[str, Any]) -> dict[str, float | None]:
    """One (vLLM run, inferq run) pair as flat figures: both sides' request figures and their ratio,
    CPU microseconds per output token by role, the CPU ratios, and the idle side's CPU."""
    out: dict[str, float | None] = {}
    for key, where in METRICS:
        out[f"vllm_{key}"], out[f"inferq_{key}"] = _get(v, where), _get(q, where)
        out[f"ratio_{key}"] = _ratio(out[f"inferq_{key}"], out[f"vllm_{key}"])
    for side, rep in (("vllm", v), ("inferq", q)):
        win = rep["cpu_window"]
        tokens = max(win["tokens"], 1)
        for role in ROLES[side]:
            name = role if role.startswith(side) else f"{side}_{role}"
            out[f"{name}_us_per_token"] = win["cpu_s"].get(role, 0.0) * 1e6 / tokens
        other = "inferq" if side == "vllm" else "vllm"
        idle = sum(win["cpu_s"].get(role, 0.0) for role in ROLES[other] if role != "client")
        out[f"idle_{other}_cpu_pct"] = idle / max(win["seconds"], 1e-9) * 100
        out[f"{side}_errors"] = float(rep["requests"]["failed"])
    stack = sum(out[f"inferq_{r}_us_per_token"] or 0.0 for r in ("worker", "api", "redis"))
    out["inferq_stack_us_per_token"] = stack
    out[CPU_RATIO] = _ratio(out["inferq_worker_us_per_token"], out["vllm_api_server_us_per_token"])
    out["cpu_ratio_stack_vs_vllm_api"] = _ratio(stack, out["vllm_api_server_us_per_token"])
    out["cpu_ratio_engine_core"] = _ratio(out["inferq_worker_engine_core_us_per_token"],
                                          out["vllm_engine_core_us_per_token"])
    return out


def spread(pairs: list[dict[str, float | None]]) -> dict[str, dict[str, float] | None]:
    """Per figure: median, min and max over the pairs."""
    out: dict[str, dict[str, float] | None] = {}
    for key in pairs[0]:
        values = [v for p in pairs if (v := p[key]) is not None]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)} if values \
            else None
    return out


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key.startswith(("ratio_", "cpu_ratio")) or key.endswith("req_s"):
        return f"{value:.3f}"
    return f"{value:.1f}"


def level_table(level: int, pairs: list[dict[str, float | None]], st: dict[str, dict[str, float] | None],
                title: str) -> Table:
    table = Table(title=f"concurrency {level}: {title}", title_justify="left")
    table.add_column("figure")
    for i in range(len(pairs)):
        table.add_column(f"pair {i + 1}", justify="right")
    table.add_column("median", justify="right")
    table.add_column("spread (min..max)", justify="right")
    for key in pairs[0]:
        s = st[key]
        table.add_row(LABELS.get(key, key.replace("_", " ")), *(_fmt(key, p[key]) for p in pairs),
                      _fmt(key, s["median"] if s else None),
                      f"{_fmt(key, s['min'])}..{_fmt(key, s['max'])}" if s else "-",
                      end_section=key.startswith(("ratio_itl_p99", "cpu_ratio_engine")))
    return table


def pair_line(c: int, pair: int, f: dict[str, float | None], load: list[float]) -> str:
    """The progress line of one pair."""
    return (f"  c={c} pair {pair}: output tok/s vLLM {_fmt('', f['vllm_output_tok_s'])}, inferq "
            f"{_fmt('', f['inferq_output_tok_s'])} (ratio {_fmt('ratio_', f['ratio_output_tok_s'])}); "
            f"{LABELS[CPU_RATIO]} {_fmt('ratio_', f[CPU_RATIO])} "
            f"({_fmt('', f['inferq_worker_us_per_token'])} / "
            f"{_fmt('', f['vllm_api_server_us_per_token'])} µs); "
            "idle side's CPU: inferq "
            f"{_fmt('', f['idle_inferq_cpu_pct'])} %, vLLM {_fmt('', f['idle_vllm_cpu_pct'])} %; errors "
            f"{f['vllm_errors'] or 0:.0f} / {f['inferq_errors'] or 0:.0f}; load {load}")


def level_summary(c: int, figs: list[dict[str, float | None]], st: dict[str, dict[str, float] | None]
                  ) -> list[str]:
    """The lines after a level's table: the CPU ratio per pair and its median, the tok/s ratio's
    median, and a warning if the idle side was not idle."""

    def median(key: str) -> str:
        s = st[key]
        return _fmt("ratio_", s["median"] if s else None)

    lines = [f"c={c}: {LABELS[CPU_RATIO]}: pairs {', '.join(_fmt('ratio_', f[CPU_RATIO]) for f in figs)}, "
             f"median {median(CPU_RATIO)}; output tok/s inferq / vLLM: median {median('ratio_output_tok_s')}"]
    idle = max((f[k] or 0.0) for f in figs for k in ("idle_inferq_cpu_pct", "idle_vllm_cpu_pct"))
    if idle > 5:
        lines.append(f"[yellow]c={c}: the idle side used up to {idle:.1f} % of a core while the other "
                     "was measured[/]")
    return lines


def thread_table(level: int, runs: list[dict[str, dict[str, Any]]], top: int = 8) -> Table:
    """Where each side's server process spends its CPU, per thread group: median µs per output token
    over the pairs (vLLM's API server, inferq's worker), heaviest groups first."""
    table = Table(title=f"concurrency {level}: server process CPU µs per output token, by thread (median)",
                  title_justify="left")
    columns: dict[str, list[tuple[str, float]]] = {}
    for side, label in (("vllm", "vLLM API server"), ("inferq", "inferq worker")):
        per_group: dict[str, list[float]] = {}
        for pair in runs:
            win = pair[side]["cpu_window"]
            tokens = max(win["tokens"], 1)
            for group, seconds in win.get("threads", {}).get("cpu_s", {}).items():
                per_group.setdefault(group, []).append(seconds * 1e6 / tokens)
        medians = {g: statistics.median(v + [0.0] * (len(runs) - len(v))) for g, v in per_group.items()}
        ranked = sorted(medians.items(), key=lambda kv: -kv[1])
        rest = sum(v for _, v in ranked[top:])
        columns[label] = ranked[:top] + ([(f"{len(ranked) - top} others", rest)] if len(ranked) > top else [])
        columns[label].append(("all threads", sum(medians.values())))
        table.add_column(label)
        table.add_column("µs", justify="right")
    for i in range(max(len(v) for v in columns.values())):
        row: list[str] = []
        for cells in columns.values():
            row += [cells[i][0], f"{cells[i][1]:.1f}"] if i < len(cells) else ["", ""]
        table.add_row(*row)
    return table
