"""The engine dies with its worker: a small watchdog process that outlives the worker by seconds.

vLLM runs its engine core (and, with several GPUs, its workers) in child processes. A
worker that exits cleanly shuts them down, but one that is SIGKILLed, OOM-killed or
crashes leaves them running as orphans, holding their memory (on a GPU: the GPU's
memory, so the next worker on that device cannot start). The reaper, started by the
worker before it builds the engine, notes the worker's descendants and, as soon as
the worker is gone, terminates the ones still alive (SIGTERM, then SIGKILL after
``--grace`` seconds), then exits.

It learns of the worker's end from a pidfd (Linux 5.3+), at once and without
polling. Listing descendants reads every process's ``/proc`` entry, so it looks
every ``--interval`` seconds only while they change (the engine starts its processes
once, at start-up), doubling the wait up to ``--max-interval`` when nothing new
appeared: an idle reaper costs next to nothing (0.6 % of a core when it looked every
0.5 s).

    python -m workers.engine_reaper --parent PID
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import time

import psutil

log = logging.getLogger(__name__)


def start(parent: int | None = None, interval: float = 0.5, grace: float = 3.0,
          max_interval: float = 10.0) -> subprocess.Popen[bytes]:
    """Start the reaper of ``parent``'s (this process's) descendants; it ends on its own after them."""
    argv = [sys.executable, "-m", "workers.engine_reaper", "--parent", str(parent or os.getpid()),
            "--interval", str(interval), "--max-interval", str(max_interval), "--grace", str(grace)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def _descendants(parent: psutil.Process, known: dict[int, psutil.Process]) -> None:
    """Add ``parent``'s live descendants (but this reaper) to ``known``; psutil's objects remember
    each one's start time, so a recycled pid is never mistaken for it."""
    try:
        for child in parent.children(recursive=True):
            if child.pid != os.getpid() and child.pid not in known:
                known[child.pid] = child
    except psutil.Error:
        pass


def _alive(process: psutil.Process) -> bool:
    """Running, and not a zombie (a killed worker that its own parent has not waited for yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap(known: dict[int, psutil.Process], grace: float) -> list[int]:
    """Terminate the processes of ``known`` still running (SIGKILL after ``grace`` s); their pids."""
    alive = [p for p in known.values() if p.is_running()]
    for process in alive:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=grace)
    return [p.pid for p in alive]


class _ExitWaiter:
    """Waits for a process to end: on its pidfd where the kernel has them, else by looking."""

    def __init__(self, process: psutil.Process):
        self.process = process
        self._poll: select.poll | None = None
        try:
            fd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # before Linux 5.3 or Python 3.9
            return
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def gone_within(self, seconds: float) -> bool:
        """Whether the process ended (or became a zombie) within ``seconds``."""
        if self._poll is not None:
            if self._poll.poll(seconds * 1000):  # readable once it has exited, zombie or reaped
                return True
            return not _alive(self.process)
        deadline = time.monotonic() + seconds
        while _alive(self.process):
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5, seconds))
        return True


def watch(parent_pid: int, interval: float, grace: float, max_interval: float | None = None) -> None:
    """Note ``parent_pid``'s descendants until it is gone, then reap them."""
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    longest = max(max_interval or interval, interval)
    waiter = _ExitWaiter(parent)
    known: dict[int, psutil.Process] = {}
    wait = interval
    while _alive(parent):
        seen = len(known)
        _descendants(parent, known)
        wait = interval if len(known) != seen else min(wait * 2, longest)
        if waiter.gone_within(wait):
            break
    reaped = reap(known, grace)
    if reaped:
        log.warning("worker %d is gone; ended its engine processes %s", parent_pid, reaped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", type=int, required=True, help="the worker's pid")
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds between looks at its processes while they change")
    parser.add_argument("--max-interval", type=float, default=10.0,
                        help="longest wait between looks once they stopped changing")
    parser.add_argument("--grace", type=float, default=3.0, help="seconds from SIGTERM to SIGKILL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-reaper: %(message)s")
    # Ctrl-C and SIGTERM go to the worker, which stops its engine; the reaper stays to the end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch(args.parent, args.interval, args.grace, args.max_interval)


if __name__ == "__main__":
    main()
