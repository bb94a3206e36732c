"""A small process supervisor: start programs, restart the ones that die, stop them in order.

``inferq run`` hands it the Procfile's processes (and a private Redis when it starts one).
Each program runs as ``/bin/sh -c COMMAND`` in its own session (the Procfile's ``exec``
makes the shell the program itself), its output relayed to stdout with the time and its
name in front, as honcho prints it.

A program that ends with a non-zero status or by a signal has *died*: the death is logged
with its status, what is left of its process group is killed (a gunicorn worker holding the
port, an engine process holding memory), and it is restarted after a delay that doubles
from ``RestartPolicy.backoff`` up to ``backoff_max``. More than ``limit`` deaths within
``window`` seconds and the supervisor gives up: it stops everything and returns
:data:`GAVE_UP`. A program that exits by itself with status 0 was asked to (``celery control
shutdown``, a SIGTERM sent to it directly): the others stop too, as they did under honcho.

SIGINT and SIGTERM stop everything without restarts: SIGTERM to each program's leader only
(so a worker finishes its requests before it stops its engine), SIGKILL to the whole group
of any still running ``kill_wait`` seconds later. Programs marked ``first`` (Redis) start
before the others and stop after them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO

#: The supervisor's return code after SIGINT / SIGTERM (the shell's 128 + signal, as honcho's).
SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Its return code when a program died more often than the restart policy allows.
GAVE_UP = 1
#: Seconds a ``first`` program has to become ready before the others start.
READY_TIMEOUT = 10.0
POLL = 0.1
SYSTEM = "system"


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``limit`` restarts of a program within ``window`` seconds, each after a delay
    doubling from ``backoff`` to ``backoff_max``; ``limit`` 0 never restarts."""

    limit: int = 5
    window: float = 300.0
    backoff: float = 1.0
    backoff_max: float = 30.0

    def delay(self, recent_deaths: int) -> float:
        """Seconds to wait before the next start, after ``recent_deaths`` earlier deaths."""
        return float(min(self.backoff * 2 ** min(recent_deaths, 30), self.backoff_max))


@dataclass
class Program:
    """One command to keep running; ``first``: started (and ``ready``) before the others,
    stopped after them."""

    name: str
    command: str
    env: dict[str, str]
    first: bool = False
    ready: Callable[[], bool] | None = None


def describe_exit(returncode: int) -> str:
    """``exit status 3``, or ``exit status -9, SIGKILL`` for a program ended by a signal."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"exit status {returncode}, {signal.Signals(-returncode).name}"
    except ValueError:
        return f"exit status {returncode}"


class Output:
    """Lines prefixed with the time and a name, written whole from any thread."""

    def __init__(self, stream: IO[str] | None, width: int):
        self.stream = stream
        self.width = width
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        stream = self.stream or sys.stdout  # resolved late: pytest's capture swaps sys.stdout
        prefix = f"{datetime.now():%H:%M:%S} {name.ljust(self.width)} | "
        with self._lock:
            print(prefix + text, file=stream, flush=True)


@dataclass
class _State:
    """A program and its current process (None while it waits for a restart or has ended)."""

    program: Program
    proc: subprocess.Popen[bytes] | None = None
    relay: threading.Thread | None = None
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


class Supervisor:
    """Runs ``programs`` until a signal, a clean exit of one of them, or a program that keeps dying."""

    def __init__(self, programs: Iterable[Program], kill_wait: float, policy: RestartPolicy,
                 stream: IO[str] | None = None):
        self.states = [_State(p) for p in programs]
        self.kill_wait = kill_wait
        self.policy = policy
        self.out = Output(stream, max(len(SYSTEM), *(len(s.program.name) for s in self.states)))
        #: Why it gave up (a program that kept dying), for the caller's last message.
        self.gave_up: str | None = None
        self.returncode: int | None = None
        self._signal: signal.Signals | None = None

    def run(self) -> int:
        """Start everything, supervise until told to stop, stop everything; the return code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNAL_CODES}
        try:
            if self._start_tier(first=True) and self._start_tier(first=False):
                self._watch()
            self._note_signal()
            self._stop_tier(first=False)
            self._stop_tier(first=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.returncode or 0

    @property
    def stopping(self) -> bool:
        return self._signal is not None or self.returncode is not None

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only a note here: the loop prints and acts (printing here could deadlock on the output lock).
        if self._signal is None:
            self._signal = signal.Signals(signum)

    def _note_signal(self) -> None:
        if self._signal is not None and self.returncode is None:
            self.returncode = SIGNAL_CODES[self._signal]
            self._system(f"{self._signal.name} received")

    def _system(self, text: str) -> None:
        self.out.line(SYSTEM, text)

    # Starting

    def _start_tier(self, first: bool) -> bool:
        tier = [s for s in self.states if s.program.first == first]
        for state in tier:
            self._start(state)
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = [s for s in tier if s.program.ready is not None]
        while waiting and not self.stopping:
            for state in waiting:
                if state.proc is not None and state.proc.poll() is not None:
                    return self._failed_to_start(state, f"exited ({describe_exit(state.proc.returncode)})")
            waiting = [s for s in waiting if not _is_ready(s.program)]
            if waiting and time.monotonic() > deadline:
                return self._failed_to_start(waiting[0], f"was not ready within {READY_TIMEOUT:g} s")
            time.sleep(POLL)
        return not self.stopping

    def _failed_to_start(self, state: _State, why: str) -> bool:
        self.gave_up = f"{state.program.name} {why} before the others could start"
        self._system(self.gave_up)
        self.returncode = GAVE_UP
        return False

    def _start(self, state: _State) -> None:
        program = state.program
        state.restart_at = None
        proc = subprocess.Popen(program.command, shell=True, env=program.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        state.proc = proc
        self._system(f"{program.name} started (pid={proc.pid})")
        state.relay = threading.Thread(target=self._relay, args=(program.name, proc), daemon=True,
                                       name=f"relay-{program.name}")
        state.relay.start()

    def _relay(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for raw in iter(proc.stdout.readline, b""):
                self.out.line(name, raw.decode("utf-8", "replace").rstrip("\r\n"))

    # Watching

    def _watch(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            for state in self.states:
                if state.proc is not None and state.proc.poll() is not None:
                    self._ended(state, now)
                elif state.proc is None and state.restart_at is not None and now >= state.restart_at:
                    self._start(state)
                if self.stopping:
                    return
            time.sleep(POLL)

    def _ended(self, state: _State, now: float) -> None:
        proc, name = self._reap(state), state.program.name
        if proc.returncode == 0:
            self._system(f"{name} stopped (rc=0): it exited by itself, so everything stops")
            self.returncode = 0
            return
        _kill_group(proc.pid)  # what the leader leaves behind would hold ports, memory, GPUs
        while state.deaths and now - state.deaths[0] > self.policy.window:
            state.deaths.popleft()
        if len(state.deaths) >= self.policy.limit:
            times = f"{len(state.deaths) + 1} time{'s' if state.deaths else ''}"
            self.gave_up = (f"{name} died {times} within {self.policy.window:g} s "
                            f"(last: {describe_exit(proc.returncode)}), more than RESTART_LIMIT="
                            f"{self.policy.limit} allows: stopping everything")
            self._system(self.gave_up)
            self.returncode = GAVE_UP
            return
        delay = self.policy.delay(len(state.deaths))
        state.deaths.append(now)
        state.restart_at = now + delay
        self._system(f"{name} died ({describe_exit(proc.returncode)}): restarting in {delay:g} s "
                     f"(restart {len(state.deaths)} of {self.policy.limit} within {self.policy.window:g} s)")

    def _reap(self, state: _State) -> subprocess.Popen[bytes]:
        """The ended process, its last output relayed first."""
        proc = state.proc
        assert proc is not None
        if state.relay is not None:
            state.relay.join(0.5)  # the pipe may stay open in a child it left behind
        state.proc = state.relay = None
        return proc

    # Stopping

    def _stop_tier(self, first: bool) -> None:
        tier = [s for s in self.states if s.program.first == first]
        for state in tier:
            state.restart_at = None
        running = [s for s in tier if s.proc is not None]
        if not running:
            return
        for state in running:
            assert state.proc is not None
            if state.proc.poll() is None:
                self._system(f"sending SIGTERM to {state.program.name} (pid {state.proc.pid})")
                with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                    os.kill(state.proc.pid, signal.SIGTERM)  # the leader only: it stops its children
        deadline = time.monotonic() + self.kill_wait
        killed = False
        while running:
            for state in list(running):
                assert state.proc is not None
                if state.proc.poll() is not None:
                    running.remove(state)
                    self._stopped(state)
            if running and not killed and time.monotonic() >= deadline:
                killed = True
                for state in running:
                    assert state.proc is not None
                    self._system(f"sending SIGKILL to {state.program.name} (pid {state.proc.pid})")
                    _kill_group(state.proc.pid)
            self._note_signal()
            time.sleep(POLL)

    def _stopped(self, state: _State) -> None:
        name = state.program.name
        rc = self._reap(state).returncode
        by = f" by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else ""
        # "stopped last" for Redis and the like: it outlived the programs that use it.
        self._system(f"{name} stopped {'last ' if state.program.first else ''}(rc={rc}){by}")
        if self.returncode is None:
            self.returncode = rc


def _is_ready(program: Program) -> bool:
    try:
        return program.ready is None or program.ready()
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _kill_group(pid: int) -> None:
    """SIGKILL every process left in the group ``pid`` led."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
