"""CPU time of one Python process per thread, grouped by the thread's Python name.

A worker's CPU per token is the sum of very different threads: vLLM's event loop, the
delta publisher, Celery's consumer (its main thread) and task threads, heartbeats, and
native threads (torch, tokenizers). To know which one to work on, read each thread's CPU
from ``/proc/<pid>/task/<tid>/schedstat`` around a measured run, and name it by what py-spy
reports for that native thread id (``py-spy dump --nonblocking``: it does not stop the
process). Threads py-spy does not list are native ones, named by their ``comm``. Names
that differ only by a number (``ThreadPoolExecutor-0_3``) are one group (``ThreadPoolExecutor-0_*``).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from benchmarks.profiling import py_spy

_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "(.*)"\s*$', re.MULTILINE)
_NUMBER = re.compile(r"\d+$")
_TICK = os.sysconf("SC_CLK_TCK")


def python_names(pid: int, timeout: float = 20.0) -> dict[int, str]:
    """Native thread id -> Python thread name, for the threads py-spy sees (empty if it cannot)."""
    try:
        out = subprocess.run([py_spy(), "dump", "--nonblocking", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=timeout, check=False).stdout
    except Exception:  # noqa: BLE001 - py-spy missing, refused or slow: the threads go unnamed
        return {}
    return {int(tid): name for tid, name in _THREAD.findall(out)}


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each of ``pid``'s threads, by native thread id.

    From ``schedstat`` (nanoseconds on the CPU): ``stat``'s user and system times are in clock
    ticks (10 ms), too coarse for threads that each run a few milliseconds in a window.
    """
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except OSError:
            continue  # ended meanwhile
        except (ValueError, IndexError):  # a kernel without schedstat: ticks
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return out


def group_name(pid: int, tid: int, names: dict[int, str]) -> str:
    """The group a thread's CPU is counted in: its Python name without a trailing number, else
    ``native:<comm>``."""
    name = names.get(tid)
    if name is None:
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            comm = "?"
        return "native:" + _NUMBER.sub("*", comm)
    return _NUMBER.sub("*", name)


class ThreadWindow:
    """Per-group CPU seconds of one process between :meth:`open` and :meth:`close`."""

    def __init__(self, pid: int):
        self.pid = pid
        self._before: dict[int, float] = {}

    def open(self) -> None:
        """Read every thread's CPU: the window opens."""
        self._before = thread_cpu(self.pid)

    def close(self) -> dict[str, float]:
        """CPU seconds per group since :meth:`open` (threads are named now, by py-spy, which takes a
        fraction of a second: after the measured run). A thread that started and ended in between
        is not counted."""
        after = thread_cpu(self.pid)
        names = python_names(self.pid)
        out: dict[str, float] = {}
        for tid, seconds in after.items():
            group = group_name(self.pid, tid, names)
            out[group] = out.get(group, 0.0) + seconds - self._before.get(tid, 0.0)
        return {group: round(seconds, 5) for group, seconds in sorted(out.items(), key=lambda kv: -kv[1])}
