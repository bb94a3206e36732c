"""``inferq run`` supervises: a process that dies is logged, restarted with backoff, up to a limit.

The stack runs as in tests/test_stack.py (scripted engine, free ports, its own Redis); the
restart-policy tests run ``inferq run`` on a Procfile of stand-ins (``sleep``, ``exit 3``),
which the supervisor treats exactly as it treats the real processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from inferq.supervisor import RestartPolicy, describe_exit
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, free_port, wait_for
from tests.test_stack import _run_env, _start_run, live_sessions

STARTED = re.compile(r"(\S+) started \(pid=(\d+)\)")
STAND_INS = ("api: exec sleep 60\ncoordinator: exec sleep 60\nflower: exec sleep 60\n"
             "gpu-monitor: exec sleep 60\n")


def started(log_path: Path, name: str) -> list[int]:
    """Pids ``name`` was started with, in order."""
    return [int(pid) for who, pid in STARTED.findall(log_path.read_text(errors="replace")) if who == name]


def wait_in_log(log_path: Path, text: str, timeout: float, run: subprocess.Popen[bytes]) -> None:
    wait_for(lambda: text in log_path.read_text(errors="replace"), timeout, repr(text), run)


def stop_run(run: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> int:
    """Signal the run's group as a terminal would; its exit code."""
    if run.poll() is None:
        os.killpg(run.pid, sig)
    return run.wait(timeout)


def clean_up(run: subprocess.Popen[bytes], log_path: Path) -> None:
    """After a failure: stop the run, and if it will not stop, every process it started."""
    if run.poll() is None:
        try:
            stop_run(run, signal.SIGTERM, 40)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            for pid in all_sessions(log_path):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)


def all_sessions(log_path: Path) -> set[int]:
    return {int(pid) for _, pid in STARTED.findall(log_path.read_text(errors="replace"))}


def test_restart_delay_doubles_up_to_its_cap_and_exits_are_described() -> None:
    policy = RestartPolicy(limit=5, window=300, backoff=1, backoff_max=30)
    assert [policy.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert describe_exit(3) == "exit status 3"
    assert describe_exit(-9) == "exit status -9, SIGKILL"


def test_a_killed_worker_is_logged_restarted_and_the_stack_serves_again(tmp_path: Path) -> None:
    """SIGKILL the worker: /ready goes 503, then 200 once it is back, and a chat succeeds, hands off."""
    api_port = free_port()
    # A restart delay longer than the heartbeat TTL (3 s): the gap is sure to show on /ready.
    env = {**_run_env(tmp_path, api_port), "RESTART_BACKOFF": "4", "IP_RATE_LIMIT": "10000/minute"}
    run, log_path = _start_run(tmp_path, env)
    base = f"http://127.0.0.1:{api_port}"

    def ready() -> int:
        return httpx.get(f"{base}/ready", timeout=2).status_code

    try:
        wait_for(lambda: ready() == 200, 120, "/ready", run)
        [worker_pid] = started(log_path, "worker")
        os.kill(worker_pid, signal.SIGKILL)
        wait_in_log(log_path, "worker died (exit status -9, SIGKILL): restarting in 4 s", 10, run)
        wait_for(lambda: ready() == 503, 15, "/ready 503 while no worker is live", run)
        assert httpx.get(f"{base}/ready", timeout=2).json()["error"]["code"] == "no_live_worker"
        wait_for(lambda: ready() == 200, 60, "/ready 200 once the worker is back", run)
        reply = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {TEST_KEY}"},
                           json={"model": SCRIPTED_MODEL, "max_tokens": 3,
                                 "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        code = stop_run(run, signal.SIGINT, 60)
    finally:
        clean_up(run, log_path)
    output = log_path.read_text(errors="replace")
    restarted = started(log_path, "worker")
    assert len(restarted) == 2 and restarted[0] == worker_pid, output
    assert "restart 1 of 5 within 300 s" in output, output
    assert code == 130, output
    assert output.count("stopped (rc=0)") == 5, output  # the new worker stopped cleanly too
    assert live_sessions(all_sessions(log_path)) == [], output
    assert "Traceback" not in output, output


def _stand_in_run(tmp_path: Path, worker: str, **settings: str
                  ) -> tuple[subprocess.Popen[bytes], Path, dict[str, str]]:
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"worker: {worker}\n{STAND_INS}")
    env = {**_run_env(tmp_path, free_port()), **settings}
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        argv = [sys.executable, "-m", "inferq.cli", "run", "--procfile", str(procfile)]
        run = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return run, log_path, env


def test_a_process_that_keeps_dying_stops_everything_with_a_clear_message(tmp_path: Path) -> None:
    run, log_path, _ = _stand_in_run(tmp_path, "echo crashing; exit 3", RESTART_LIMIT="2",
                                     RESTART_BACKOFF="0.2")
    try:
        code = run.wait(60)
    finally:
        clean_up(run, log_path)
    output = log_path.read_text(errors="replace")
    assert code == 1, output
    assert "worker died (exit status 3): restarting in 0.2 s (restart 1 of 2 within 300 s)" in output
    assert "worker died (exit status 3): restarting in 0.4 s (restart 2 of 2 within 300 s)" in output
    assert ("inferq run gave up: worker died 3 times within 300 s (last: exit status 3), more than "
            "RESTART_LIMIT=2 allows: stopping everything") in output, output
    assert len(started(log_path, "worker")) == 3 and output.count("crashing") == 3, output
    for name in ("api", "coordinator", "flower", "gpu-monitor"):
        assert f"{name} stopped (rc=-15) by SIGTERM" in output, output
    assert "redis-server stopped last (rc=0)" in output.rsplit("stopped (rc=", 1)[1], output
    assert live_sessions(all_sessions(log_path)) == [], output


def test_a_private_redis_that_dies_is_restarted(tmp_path: Path) -> None:
    run, log_path, env = _stand_in_run(tmp_path, "exec sleep 60", RESTART_BACKOFF="0.2")
    try:
        wait_for(lambda: len(all_sessions(log_path)) == 6, 30, "six processes", run)
        [redis_pid] = started(log_path, "redis-server")
        os.kill(redis_pid, signal.SIGKILL)
        wait_in_log(log_path, "redis-server died (exit status -9, SIGKILL): restarting in 0.2 s", 10, run)
        wait_for(lambda: redis.Redis.from_url(env["REDIS_URL"]).ping(), 15, "Redis again", run)
        code = stop_run(run, signal.SIGINT, 60)
    finally:
        clean_up(run, log_path)
    output = log_path.read_text(errors="replace")
    assert code == 130 and len(started(log_path, "redis-server")) == 2, output
    assert output.count("stopped (rc=-15) by SIGTERM") == 5, output  # the sleeps
    assert "redis-server stopped last (rc=0)" in output, output
    assert live_sessions(all_sessions(log_path)) == [], output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_during_a_restart_delay_stops_without_restarting(tmp_path: Path,
                                                                  sig: signal.Signals) -> None:
    """``inferq stop`` (SIGTERM) and Ctrl-C (SIGINT) while a dead worker waits for its restart."""
    run, log_path, _ = _stand_in_run(tmp_path, "exec sleep 60", RESTART_BACKOFF="30")
    try:
        wait_for(lambda: len(all_sessions(log_path)) == 6, 30, "six processes", run)
        os.kill(started(log_path, "worker")[0], signal.SIGKILL)
        wait_in_log(log_path, "worker died (exit status -9, SIGKILL): restarting in 30 s", 10, run)
        began = time.monotonic()
        code = stop_run(run, sig, 30)
        took = time.monotonic() - began
    finally:
        clean_up(run, log_path)
    output = log_path.read_text(errors="replace")
    assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], output
    assert f"{sig.name} received" in output and took < 10, output
    assert len(started(log_path, "worker")) == 1, output
    assert "SIGKILL to" not in output, output
    assert live_sessions(all_sessions(log_path)) == [], output
