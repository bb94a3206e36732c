"""``inferq run``: its process manager's stop, then the whole stack with the scripted engine.

The end-to-end run starts its own Redis (none answers at REDIS_URL), so it also
checks that Redis outlives the processes that use it: their last calls must not fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from honcho import manager as honcho_manager

from inferq.stack import STOP_MARGIN, run_processes
from tests.conftest import ROOT, SCRIPTED_MODEL, TEST_KEY, free_port, wait_for

GRACEFUL = 5  # API_GRACEFUL_TIMEOUT for this run

SLOW_STOP = """
import signal, sys, time
def stop(signum, frame):
    time.sleep(float(sys.argv[1]))
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def run_with_a_slow_stopper(tmp_path: Path, stop_seconds: float, kill_wait: float) -> float:
    """One process exits at once; the other needs ``stop_seconds`` after SIGTERM. Seconds taken."""
    slow = tmp_path / "slow.py"
    slow.write_text(SLOW_STOP)
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"quick: sleep 0.5\nslow: exec {sys.executable} {slow} {stop_seconds}\n")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        run_processes(procfile, ("quick", "slow"), dict(os.environ), kill_wait)
    finally:
        for sig, handler in handlers.items():  # Manager.loop installs its own
            signal.signal(sig, handler)
    return time.monotonic() - started


def test_processes_get_the_kill_wait_not_honchos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(honcho_manager, "KILL_WAIT", 0.2)  # honcho's own wait, made short here
    took = run_with_a_slow_stopper(tmp_path, stop_seconds=1.5, kill_wait=10)
    out = capsys.readouterr().out
    assert "slow stopped (rc=3)" in out, out  # its own exit after 1.5 s, well past KILL_WAIT
    assert "SIGKILL" not in out and took < 10, out


def test_a_process_that_will_not_stop_is_killed_after_the_kill_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(honcho_manager, "KILL_WAIT", 0.2)
    took = run_with_a_slow_stopper(tmp_path, stop_seconds=60, kill_wait=1)
    out = capsys.readouterr().out
    assert "sending SIGKILL to slow" in out and "slow stopped (rc=-9)" in out, out
    assert took < 10, out


LEADER_WITH_CHILD = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", (
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('signalled'), sys.exit(0)))\\n"
    "time.sleep(60)"), sys.argv[1]])
def stop(signum, frame):
    time.sleep(0.5)  # a warm shutdown: the child must still be working meanwhile
    alive = child.poll() is None
    child.terminate()
    child.wait()
    sys.exit(0 if alive else 4)
signal.signal(signal.SIGTERM, stop)
time.sleep(60)
"""


def test_sigterm_reaches_the_leader_only_its_children_stop_in_its_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A worker's vLLM engine process must outlive the worker's warm shutdown."""
    leader, marker = tmp_path / "leader.py", tmp_path / "child-signalled"
    leader.write_text(LEADER_WITH_CHILD)
    procfile = tmp_path / "Procfile"
    procfile.write_text(f"quick: sleep 1\nleader: exec {sys.executable} {leader} {marker}\n")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_processes(procfile, ("quick", "leader"), dict(os.environ), 10)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out = capsys.readouterr().out
    assert "leader stopped (rc=0)" in out, out  # rc 4: its child had been signalled with it
    assert marker.read_text() == "signalled"  # ...by the leader, afterwards


def live_sessions(session_ids: set[int]) -> list[str]:
    """Processes (not zombies) still running in any of these sessions."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, _ppid, _pgrp, session = rest.split()[:4]
        if int(session) in session_ids and state != "Z":
            alive.append(f"{stat.parent.name} {comm.split('(', 1)[1]}")
    return alive


def _run_env(tmp_path: Path, api_port: int) -> dict[str, str]:
    """``inferq run``'s environment: the scripted engine, free ports, no Redis yet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.update({
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing there: the run starts Redis
        "DATABASE_URL": f"sqlite:///{tmp_path / 'inferq.db'}",
        "FILES_DIR": str(tmp_path / "files"),
        "API_KEYS": TEST_KEY,
        "ENGINE": "scripted",
        "SERVED_MODEL_NAME": SCRIPTED_MODEL,
        "MAX_NUM_SEQS": "4",
        "API_PORT": str(api_port),
        "API_WORKERS": "1",
        "API_GRACEFUL_TIMEOUT": str(GRACEFUL),
        "FLOWER_PORT": str(free_port()),
        "WORKER_METRICS_PORT": "0",
        "COORDINATOR_METRICS_PORT": "0",
        "GPU_MONITOR_PORT": str(free_port()),
        "WORKER_HEARTBEAT_INTERVAL": "1",
        "WORKER_HEARTBEAT_TTL": "3",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _start_run(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        # Its own session, like a shell's foreground job: Ctrl-C is SIGINT to this group.
        argv = [sys.executable, "-m", "inferq.cli", "run", "--procfile", str(ROOT / "Procfile")]
        run = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return run, log_path


def test_ctrl_c_stops_every_process_cleanly(tmp_path: Path) -> None:
    """Ctrl-C while a stream is in flight: the stream still gets every token and ``[DONE]``."""
    from tests.sse_client import content, frames

    api_port = free_port()
    run, log_path = _start_run(tmp_path, _run_env(tmp_path, api_port))
    base = f"http://127.0.0.1:{api_port}"
    tokens = 40  # 2 s at 0.05 s a token, well inside API_GRACEFUL_TIMEOUT
    try:
        wait_for(lambda: httpx.get(f"{base}/ready", timeout=2).status_code == 200, 120, "/ready", run)
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {TEST_KEY}"},
                          json={"model": SCRIPTED_MODEL, "max_tokens": tokens, "stream": True,
                                "messages": [{"role": "user", "content": "[[delay=0.05]] hi"}]}) as resp:
            assert resp.status_code == 200
            pieces = resp.iter_text()
            received = next(pieces)
            while "tok0" not in received:  # generating: the Ctrl-C lands mid-stream
                received += next(pieces)
            started = time.monotonic()
            os.killpg(run.pid, signal.SIGINT)
            received += "".join(pieces)
        run.wait(GRACEFUL + STOP_MARGIN + 15)
        stopped_in = time.monotonic() - started
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    output = log_path.read_text(errors="replace")
    assert frames(received)[-1] == "[DONE]", received
    assert content(received) == " ".join(f"tok{i}" for i in range(tokens)), received
    sessions = {int(pid) for pid in re.findall(r"started \(pid[= ](\d+)", output)}
    assert len(sessions) == 6, output  # redis-server and the Procfile's five processes
    assert live_sessions(sessions) == [], output
    assert run.returncode == 130, output  # honcho's code for SIGINT
    assert stopped_in < GRACEFUL + STOP_MARGIN, output
    assert output.count("stopped (rc=0)") == 5, output  # each exited by itself, not by a signal
    assert "SIGKILL" not in output, output
    assert "Traceback" not in output, output
    assert "Connection refused" not in output, output
    assert "redis-server stopped" in output.rsplit("stopped (rc=", 1)[1], output  # Redis last
    assert not (tmp_path / ".env").exists()  # API_KEYS was given: no development key written


def test_inferq_stop_stops_a_stack_started_elsewhere(tmp_path: Path) -> None:
    api_port = free_port()
    env = _run_env(tmp_path, api_port)
    run, log_path = _start_run(tmp_path, env)
    stop = [sys.executable, "-m", "inferq.cli", "stop"]
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{api_port}/ready", timeout=2).status_code == 200, 120,
                 "/ready", run)
        argv = [sys.executable, "-m", "inferq.cli", "run", "--procfile", str(ROOT / "Procfile")]
        second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "already running" in second.stderr, second.stderr
        stopped = subprocess.run(stop, cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=GRACEFUL + STOP_MARGIN + 30)
        assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
        assert run.poll() is not None  # it waited for the run to end
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    output = log_path.read_text(errors="replace")
    assert output.count("stopped (rc=0)") == 5, output  # each exited by itself, not by a signal
    assert "SIGKILL" not in output and "Traceback" not in output, output
    again = subprocess.run(stop, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing is running" in again.stderr, again.stderr
