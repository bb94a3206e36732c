"""Draws ``inferq status``'s report (see :mod:`inferq.status`) as one screen with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

GIB = 1024**3
LEFT = {"host", "model", "devices", "id", "status", "name"}  # text columns; numbers align right


def _or_dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _fraction(used: Any, total: Any) -> str:
    return f"{_or_dash(used)}/{_or_dash(total)}"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", expand=False)
    for column in columns:
        table.add_column(column, justify="left" if column in LEFT else "right")
    return table


def workers_table(workers: list[dict[str, Any]]) -> Table | str:
    if not workers:
        return "Workers: none live"
    table = _table(f"Workers ({len(workers)} live)", "host", "pid", "model", "devices", "slots used",
                   "batch used (share)", "jobs")
    for w in workers:
        batch = _fraction(w["batch_in_use"], w["batch_slots"])
        if w["batch_share"] is not None:
            batch += f" ({w['batch_share']:g})"
        table.add_row(w["host"], _or_dash(w["pid"]), w["model"], _or_dash(w["devices"] or "default"),
                      _fraction(w["slots_in_use"], w["slots"]), batch, str(w["jobs_running"]))
    return table


def coordinators_line(state: dict[str, Any] | None) -> str:
    if state is None:
        return "Coordinators: unknown (Redis unreachable)"
    backlog = (f"usage entries waiting {state['usage_backlog']}, batch lines waiting "
               f"{state['batch_lines_backlog']}")
    if not state["live"]:
        return f"Coordinators: [red]none live[/] (`inferq coordinator`): batches and usage wait; {backlog}"
    return f"Coordinators: {len(state['live'])} live ({escape(', '.join(state['live']))}); {backlog}"


def queues_table(queues: list[dict[str, Any]], jobs: dict[str, int] | None) -> Table | str:
    if jobs is None:
        return "Queues: unknown (Redis unreachable)"
    summary = f": {jobs['running']} jobs running, {jobs['queued']} queued"
    table = _table(f"Queues{summary}", "model", "interactive", "batch")
    for q in queues:
        table.add_row(q["model"], str(q["interactive"]), str(q["batch"]))
    return table


def batches_table(batches: dict[str, Any]) -> Table | str:
    if not batches["readable"]:
        return f"Batches: {batches['message']}"
    if not batches["in_progress"]:
        return "Batches: none in progress"
    table = _table("Batches in progress", "id", "model", "status", "lines", "dispatched", "completed",
                   "failed")
    for b in batches["in_progress"]:
        table.add_row(b["id"], _or_dash(b["model"]), b["status"], str(b["total"]), str(b["dispatched"]),
                      str(b["completed"]), str(b["failed"]))
    return table


def gpus_table(gpus: dict[str, Any]) -> Table | str:
    if not gpus["available"]:
        return f"GPUs: {gpus['message']}"
    table = _table("GPUs", "index", "name", "utilization", "memory used", "temperature")
    for g in gpus["devices"]:
        util = "-" if g["utilization_percent"] is None else f"{g['utilization_percent']:.0f} %"
        memory = ("-" if g["memory_used_bytes"] is None else
                  f"{g['memory_used_bytes'] / GIB:.1f}/{(g['memory_total_bytes'] or 0) / GIB:.1f} GiB")
        temp = "-" if g["temperature_celsius"] is None else f"{g['temperature_celsius']:.0f} °C"
        table.add_row(str(g["index"]), g["name"], util, memory, temp)
    return table


def redis_line(state: dict[str, Any]) -> str:
    if not state["reachable"]:
        return f"Redis   {escape(state['url'])}: [red]unreachable[/] ({escape(state['error'])})"
    limit = "no limit" if not state["maxmemory"] else f"max {state['maxmemory'] / GIB:.1f} GiB"
    return (f"Redis   {escape(state['url'])}: memory {state['used_memory_human']} ({limit}), "
            f"{state['connected_clients']} clients ({state['blocked_clients']} blocked)")


def endpoint_line(e: dict[str, Any]) -> str:
    name = {"api": "API", "flower": "Flower"}.get(e["name"], e["name"])
    if not e["answers"]:
        return f"{name:<7} {escape(e['url'])}: [red]not answering[/]"
    ready = "" if "ready" not in e else f", /ready {e['ready']}"
    return f"{name:<7} {escape(e['url'])}: answers ({e['status']}{ready})"


def render(report: dict[str, Any], console: Console) -> None:
    """Print the whole report."""
    console.rule("[bold]inferq status")
    for part in (workers_table(report["workers"]), queues_table(report["queues"], report["jobs"]),
                 batches_table(report["batches"]), gpus_table(report["gpus"])):
        console.print(part, highlight=False, markup=False, soft_wrap=isinstance(part, str))
    console.print(coordinators_line(report.get("coordinators")), highlight=False, soft_wrap=True)
    console.print(redis_line(report["redis"]), highlight=False, soft_wrap=True)
    for e in report["endpoints"]:
        console.print(endpoint_line(e), highlight=False, soft_wrap=True)
