"""inferq.launcher: the private redis-server and the child processes that ``inferq run``, the
benchmarks and the tests start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from inferq import launcher


def test_a_private_redis_answers_and_is_gone_afterwards(tmp_path: Path) -> None:
    with launcher.redis_server(tmp_path) as server:
        assert redis.Redis.from_url(server.url).ping()
        assert launcher.redis_answers(server.url)
    assert server.proc.poll() is not None
    assert not launcher.redis_answers(server.url)


def test_only_inferq_runs_redis_keeps_an_append_only_file() -> None:
    private = launcher.redis_server_argv(6400, "/tmp/r")
    kept = launcher.redis_server_argv(6400, "/tmp/r", append_only=True)
    assert private[private.index("--appendonly") + 1] == "no"
    assert kept[kept.index("--appendonly") + 1] == "yes" and "everysec" in kept
    assert all(argv[argv.index("--bind") + 1] == "127.0.0.1" for argv in (private, kept))


def test_wait_for_fails_as_soon_as_the_process_exits(tmp_path: Path) -> None:
    process = launcher.Process([sys.executable, "-c", "print('bye')"], {}, tmp_path / "out.log")
    with pytest.raises(RuntimeError, match="exited with 0"):
        launcher.wait_for(lambda: False, 30, "child", process.proc)
    process.stop()
    assert process.log_tail() == "bye"


@pytest.mark.parametrize("new_session", [True, False])
def test_stop_all_terminates_then_kills_what_ignores_sigterm(tmp_path: Path, new_session: bool) -> None:
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('up', flush=True); time.sleep(60)")
    polite = "import time; time.sleep(60)"
    log = tmp_path / "stubborn.log"
    processes = [launcher.Process([sys.executable, "-c", stubborn], {}, log, new_session=new_session),
                 launcher.Process([sys.executable, "-c", polite], {}, None, new_session=new_session)]
    launcher.wait_for(lambda: log.read_text().strip() == "up", 10, "stubborn child")
    launcher.stop_all(processes, 0.5)
    assert processes[0].proc.returncode == -9 and processes[1].proc.returncode == -15


def test_started_stops_a_process_that_never_becomes_ready(tmp_path: Path) -> None:
    process = launcher.Process([sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path / "x.log")
    with pytest.raises(TimeoutError, match="never not ready after 0.3s"):
        launcher.started(process, lambda: False, 0.3, "never")
    assert process.proc.returncode == -15
