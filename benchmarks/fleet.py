"""A private stack (Redis, database, API, one worker) and a fleet of scripted workers on it, for scale_out.

:meth:`Fleet.resize` brings the number of live workers to exactly N: it starts more, or
sends the newest ones SIGTERM (a warm shutdown: a worker finishes its running requests
first) and waits until they have exited and their heartbeats are gone.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import redis

from benchmarks.stack import bench_process, child_environment, running_stack
from inferq.launcher import Process, free_port, inferq_argv, redis_server, stop_all
from queueing import liveness

MODEL = "scripted-scale"


class Fleet:
    """``inferq worker --engine scripted`` processes on the stack's Redis and model, ``slots`` task slots
    each."""

    def __init__(self, env: dict[str, str], redis_url: str, slots: int):
        self.env = child_environment(env)
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.slots = slots
        self.processes: list[Process] = []  # every worker started here, oldest first

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The workers started here, oldest first."""
        return [process.proc for process in self.processes]

    def start(self) -> subprocess.Popen[bytes]:
        """Start one more worker (its output goes to ``$INFERQ_BENCH_LOGS/worker-N.log`` if set)."""
        argv = inferq_argv("worker", "--engine", "scripted", "--concurrency", str(self.slots),
                           "--loglevel", "WARNING")
        process = bench_process(argv, self.env, f"worker-{len(self.processes) + 2}")
        self.processes.append(process)
        return process.proc

    def running(self) -> list[subprocess.Popen[bytes]]:
        """The workers started here that have not exited, oldest first."""
        return [proc for proc in self.procs if proc.poll() is None]

    def live(self) -> int:
        """Workers whose heartbeat is current (the stack's own worker included)."""
        return liveness.live_models(self.redis)[MODEL]

    def wait_live(self, n: int, timeout: float = 120, settle: float = 2.0) -> None:
        """Until ``n`` workers beat, then ``settle`` seconds for their Celery consumers to start."""
        self._wait(lambda live: live >= n, f"{n} workers live", timeout)
        time.sleep(settle)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
        """SIGTERM one worker (of this fleet, or the stack's own) and wait until it exits (it
        finishes its running requests first)."""
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def resize(self, n: int, settle: float = 2.0) -> list[subprocess.Popen[bytes]]:
        """Exactly ``n`` live workers, all of this fleet: start more, or stop the newest; then ``settle``
        seconds, whichever way it went. Returns the workers started."""
        running = self.running()
        started = [self.start() for _ in range(n - len(running))]
        for proc in reversed(running[n:]):
            self.stop(proc)
        self._wait(lambda live: live == n, f"exactly {n} workers live", 120)
        time.sleep(settle)
        return started

    def take_over(self, stack_worker: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Replace the stack's own worker (Celery's default task slots) by one of this fleet, so that
        every worker has ``slots``; returns the new one."""
        proc = self.start()
        self.wait_live(2, settle=0)
        self.stop(stack_worker)
        self._wait(lambda live: live == 1, "exactly 1 worker live", 120)
        return proc

    def _wait(self, done: Callable[[int], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done(live := self.live()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {what} after {timeout:.0f}s: {live} live")
            time.sleep(0.2)

    def stop_all(self) -> None:
        """SIGTERM every worker still running, then wait for them (SIGKILL after 60 s)."""
        stop_all(self.processes, 60)


@contextmanager
def stack(slots: int, api_workers: int, procs: list[subprocess.Popen[bytes]]) -> Iterator[tuple[str, Fleet]]:
    """A private Redis and database, the API and one worker (in ``procs``: worker, API); yields the base
    URL and the fleet for more workers. The stack's worker has Celery's default task slots
    (``MAX_NUM_SEQS`` plus a quarter), the fleet's ``slots``."""
    env = {"ENGINE": "scripted", "SERVED_MODEL_NAME": MODEL, "MAX_NUM_SEQS": str(slots),
           "MAX_QUEUE_DEPTH": "0", "LOG_LEVEL": "WARNING", "JOB_TTL": "3600"}
    with ExitStack() as cleanup:
        db_dir = cleanup.enter_context(tempfile.TemporaryDirectory())
        redis_url = cleanup.enter_context(redis_server()).url
        env.update(REDIS_URL=redis_url, DATABASE_URL=f"sqlite:///{db_dir}/scale.db")
        base = cleanup.enter_context(running_stack(free_port(), 120, api_args=("--workers", str(api_workers)),
                                                   procs=procs, **env))
        fleet = Fleet(env, redis_url, slots)
        cleanup.callback(fleet.stop_all)
        fleet.wait_live(1, settle=0)
        yield base, fleet
