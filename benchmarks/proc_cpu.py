"""CPU time of benchmark processes by role, read with psutil before and after a measured run.

A role is a process tree's main process or a part of its descendants: vLLM's engine core
(the ``VLLM::EngineCore`` process and its children, such as the CPU worker) is told apart
from the process that hosts the engine, so the API/serving CPU of vLLM's own server and
of inferq's worker can be compared without the model's compute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

#: Marks of vLLM's engine processes in their title (``VLLM::EngineCore``, ``VLLM::Worker``...).
ENGINE_MARKS = ("VLLM::", "EngineCore")


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def title(proc: psutil.Process) -> str:
    """The process's command line (its title, once ``setproctitle`` changed it), else its name."""
    try:
        return " ".join(proc.cmdline()).strip() or proc.name()
    except psutil.Error:
        return "?"


def is_engine(proc: psutil.Process) -> bool:
    return any(mark in title(proc) for mark in ENGINE_MARKS)


@dataclass(frozen=True)
class Root:
    """A process tree to account: its main process is ``main``; descendants under an engine process
    are ``engine``, the other descendants ``other`` (``None``: counted as ``main``). With ``tree``
    false, the main process alone."""

    pid: int
    main: str
    engine: str | None = None
    other: str | None = None
    tree: bool = True


Snapshot = dict[int, tuple[str, float]]


def snapshot(roots: list[Root]) -> Snapshot:
    """pid -> (role, CPU seconds) of every process of ``roots`` (their trees walked afresh; a process
    in two trees counts once, for the first)."""
    out: Snapshot = {}
    for root in roots:
        try:
            top = psutil.Process(root.pid)
        except psutil.Error:
            continue
        out.setdefault(top.pid, (root.main, cpu_seconds(top)))
        if not root.tree:
            continue
        try:
            children = top.children()
        except psutil.Error:
            continue
        for child in children:
            role = root.engine if root.engine is not None and is_engine(child) else root.other or root.main
            try:
                tree = [child, *child.children(recursive=True)]
            except psutil.Error:
                tree = [child]
            for proc in tree:
                out.setdefault(proc.pid, (role, cpu_seconds(proc)))
    return out


def delta(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds per role between two snapshots (a process born in between counts from zero)."""
    out: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        out[role] = out.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return out


def roles_of(snap: Snapshot) -> dict[str, list[int]]:
    """role -> pids, for printing what was measured."""
    out: dict[str, list[int]] = {}
    for pid, (role, _) in snap.items():
        out.setdefault(role, []).append(pid)
    return out


class ProcessGroups:
    """The processes of a benchmark, by role, for CPU time sampling (children included).

    ``roles`` maps a pid to its role; this process is ``client``; its other children
    are named by process name (``redis-server``, ``py-spy``).
    """

    def __init__(self, roles: dict[int, str]):
        self.roles = roles
        self.me = psutil.Process(os.getpid())

    def _groups(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {"client": [self.me]}
        for child in self.me.children():
            try:
                role = self.roles.get(child.pid) or child.name()
                groups.setdefault(role, []).extend([child, *child.children(recursive=True)])
            except psutil.Error:
                pass
        return groups

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far, per role."""
        out: dict[str, float] = {}
        for role, procs in self._groups().items():
            total = 0.0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                    total += times.user + times.system
                except psutil.Error:
                    pass
            out[role] = total
        return out
