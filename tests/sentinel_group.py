"""A real Redis Sentinel group for tests: a primary, replicas and three sentinels on free ports.

Every server is a ``redis-server`` process of this test (``--sentinel`` for the sentinels: the
same binary as Debian's ``redis-sentinel``), with no persistence, in a directory of its own.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, wait_for

MASTER = "inferq-test"
DOWN_AFTER_MS = 2000


@dataclass
class Server:
    """One ``redis-server`` process (data server or sentinel) and its port."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last replication; what a dead host does."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class SentinelGroup:
    """A primary, its replicas and three sentinels watching it as :data:`MASTER`."""

    workdir: Path
    primary: Server
    replicas: list[Server]
    sentinels: list[Server] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What points inferq at this group (REDIS_URL names only the database then)."""
        return {"REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
                "REDIS_SENTINEL_MASTER": MASTER, "REDIS_URL": "redis://127.0.0.1:1/0"}

    def primary_address(self) -> tuple[str, int]:
        """The primary as a live sentinel names it now."""
        for sentinel in self.sentinels:
            if sentinel.proc.poll() is None:
                host, port = sentinel.client(decode_responses=True).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return host, int(port)
        raise RuntimeError("no sentinel is running")

    def wait_failed_over(self, old_port: int, timeout: float = 30) -> int:
        """Wait until every sentinel names a new, writable primary; its port."""
        def promoted() -> bool:
            ports = {s.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1]
                     for s in self.sentinels}
            return len(ports) == 1 and int(ports.pop()) != old_port
        wait_for(promoted, timeout, "the sentinels' failover")
        port = self.primary_address()[1]
        wait_for(lambda: redis.Redis(port=port).info("replication")["role"] == "master", 10,
                 "the new primary")
        return port

    def add_replica(self, name: str) -> Server:
        """A new, empty replica of the current primary (a dead host that came back)."""
        host, port = self.primary_address() if self.sentinels else ("127.0.0.1", self.primary.port)
        server = _data_server(self.workdir, name, "--replicaof", host, str(port))
        wait_for(lambda: server.client().info("replication")["master_link_status"] == "up", 20,
                 f"replica {name} in sync", server.proc)
        self.replicas.append(server)
        return server

    def stop(self) -> None:
        for server in (*self.sentinels, *self.replicas, self.primary):
            server.stop()


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make install` (it installs it)")
    return binary


def _data_server(workdir: Path, name: str, *args: str) -> Server:
    port = free_port()
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "redis.log"
    proc = subprocess.Popen(
        [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(log), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(port, proc, log)
    wait_for(lambda: server.client().ping(), 10, f"redis-server {name}", proc)
    return server


def _sentinel(workdir: Path, name: str, primary_port: int, failover_timeout_ms: int) -> Server:
    port = free_port()
    directory = workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"  # Sentinel rewrites its config file: one each, writable
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory / 'sentinel.log'}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {MASTER} {failover_timeout_ms}\n"
        f"sentinel parallel-syncs {MASTER} 1\n")
    proc = subprocess.Popen([_binary(), str(config), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(port, proc, directory / "sentinel.log")
    wait_for(lambda: server.client().ping(), 10, f"sentinel {name}", proc)
    return server


@contextmanager
def sentinel_group(workdir: Path, replicas: int = 1,
                   failover_timeout_ms: int = 5000) -> Iterator[SentinelGroup]:
    """Start the group; yields once every sentinel sees the replicas and the two other sentinels."""
    group = SentinelGroup(workdir, _data_server(workdir, "primary"), [])
    try:
        for n in range(replicas):
            group.add_replica(f"replica{n + 1}")
        group.sentinels = [_sentinel(workdir, f"sentinel{n + 1}", group.primary.port, failover_timeout_ms)
                           for n in range(3)]

        def acquainted() -> bool:
            for sentinel in group.sentinels:
                state = sentinel.client(decode_responses=True).execute_command("SENTINEL", "MASTER", MASTER)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < replicas:
                    return False
            return True

        wait_for(acquainted, 30, "sentinels that know each other and the replicas")
        yield group
    finally:
        group.stop()


def wait_replicated(client: redis.Redis, timeout: float = 5) -> None:
    """Wait until the replicas have everything ``client``'s server has (before a kill, to lose nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.info("replication")
        offset = info["master_repl_offset"]
        lags = [v["offset"] for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if lags and min(lags) >= offset:
            return
        time.sleep(0.05)
    raise TimeoutError("replicas did not catch up")
