"""The Low items of issue 15 that are fixed in code (docs/security.md, "Low items", has the rest)."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from queueing import jobs, keys
from queueing.jobs import JobRecord, JobRequest, JobStatus
from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def test_a_reseeded_quota_counter_never_goes_negative(redis_client: redis.Redis) -> None:
    """A job reserved 1000 tokens; its counter is lost and re-seeded by a second job; when the first
    settles, its reservation must not drive ``reserved`` below zero (before: -990, i.e. 990 tokens
    of quota for free)."""
    key_id, day = f"clamp-{time.monotonic_ns()}", "2026-01-01"
    quota = keys.quota(key_id, day)
    request = JobRequest("/v1/chat/completions", "m", {"model": "m"})

    def job(reserve: int, seed: int | None = None) -> str:
        record = JobRecord(id=jobs.new_job_id(), request=request, key_id=key_id, quota_key=quota,
                           quota_day=day, quota_limit=100_000, reserved_tokens=reserve)
        jobs.create(redis_client, record, 600, seed_used=seed)
        return record.id

    first = job(1000, seed=0)
    redis_client.delete(quota)  # Redis lost the counter (or it expired) while the job ran
    job(10, seed=500)  # re-seeded from SQL: used 500, reserved only the new job's 10
    jobs.transition(redis_client, first, JobStatus.RUNNING, 600, model="m", worker="w1")
    jobs.transition(redis_client, first, JobStatus.SUCCEEDED, 600, prompt_tokens=3, completion_tokens=7)
    assert redis_client.hgetall(quota) == {"used": "510", "reserved": "0"}


def test_a_renamed_file_is_synced_with_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.db import Database
    from api.files.store import FileStore
    from config import Settings

    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        files_dir=str(tmp_path / "files"))
    db = Database(settings)
    db.create_schema()
    store = FileStore(db, settings)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    info = store.create_output("key_1", "out.jsonl", ['{"a": 1}'])
    assert synced == ["file", "dir"]  # the content, then the rename that put it in place
    assert store.path_of(info).read_text() == '{"a": 1}\n'


def test_stale_upload_parts_are_removed_at_startup(app_config: dict[str, Any]) -> None:
    from api import create_app

    files = Path(app_config["files_dir"])
    files.mkdir(parents=True)
    stale, fresh = files / ".part-crashed.jsonl", files / ".part-uploading.jsonl"
    kept = files / "file-1.jsonl"
    for path in (stale, fresh, kept):
        path.write_text("{}\n")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(kept, (two_hours_ago, two_hours_ago))
    create_app(app_config)
    assert not stale.exists()
    assert fresh.exists() and kept.exists()  # an upload in progress elsewhere, a stored file


def test_inferq_run_writes_its_key_to_an_env_file_only_its_owner_reads(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from config import get_settings
    from inferq.stack import ensure_dev_key

    monkeypatch.delenv("API_KEYS", raising=False)
    umask = os.umask(0o022)  # the usual: new files readable by everyone
    try:
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        monkeypatch.chdir(fresh)
        get_settings.cache_clear()
        key = ensure_dev_key(fresh / ".env")
        assert stat.S_IMODE((fresh / ".env").stat().st_mode) == 0o600
        assert f"API_KEYS={key}" in (fresh / ".env").read_text()

        older = tmp_path / "older"
        older.mkdir()
        existing = older / ".env"
        existing.write_text("LOG_LEVEL=INFO\n")
        existing.chmod(0o644)
        monkeypatch.chdir(older)
        monkeypatch.delenv("API_KEYS")
        get_settings.cache_clear()
        ensure_dev_key(existing)
        assert stat.S_IMODE(existing.stat().st_mode) == 0o600
        text = existing.read_text()
        assert text.startswith("LOG_LEVEL=INFO\n") and "API_KEYS=iq-dev-" in text
    finally:
        os.umask(umask)
        get_settings.cache_clear()


def test_inferq_run_never_prints_the_redis_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from config import get_settings
    from inferq import stack

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("API_KEYS", "iq-" + "k" * 30)
    monkeypatch.setenv("ENGINE", "scripted")
    monkeypatch.setenv("REDIS_URL", "redis://inferq:hunter2-secret@redis.invalid:6379/0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(stack.run, ["--procfile", str(ROOT / "Procfile")])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "Redis at redis://inferq:***@redis.invalid:6379/0 is unreachable" in result.output, result.output
    assert "hunter2" not in result.output


def test_the_private_redis_of_inferq_run_keeps_its_data(tmp_path: Path) -> None:
    from inferq.stack import redis_program

    port = free_port()
    program = redis_program(port, dict(os.environ), data_dir=tmp_path / "redis")
    assert "--appendonly yes" in program.command and "--appendfsync everysec" in program.command
    url = f"redis://127.0.0.1:{port}/0"
    for round_ in range(2):
        proc = subprocess.Popen(program.command, shell=True, cwd=tmp_path, stdout=subprocess.DEVNULL)
        try:
            wait_for(program.ready, 10, "redis-server", proc)
            client = redis.Redis.from_url(url, decode_responses=True)
            if round_ == 0:
                client.set("queued-job", "kept")
            else:
                assert client.get("queued-job") == "kept"  # back after a restart
        finally:
            proc.terminate()
            proc.wait(10)
    assert list((tmp_path / "redis").glob("appendonlydir/*.aof"))


@pytest.mark.parametrize("server", ["worker", "gpu-monitor"])
def test_a_silent_client_of_a_metrics_server_is_cut_off(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import pynvml

    from gpu_monitor import exporter
    from gpu_monitor.poller import GpuPoller
    from workers import metrics

    port = free_port()
    if server == "worker":
        monkeypatch.setattr(metrics._QuietHandler, "timeout", 0.5)
        metrics.serve(port, "127.0.0.1")
    else:
        monkeypatch.setattr(exporter._QuietHandler, "timeout", 0.5)
        gpus = exporter.GpuExporter(GpuPoller(pynvml, 60), "127.0.0.1", port)  # no driver here: "no GPU"
        gpus.start()
    wait_for(lambda: socket.create_connection(("127.0.0.1", port)), 5, f"{server} metrics")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest of its head
        started = time.monotonic()
        assert silent.recv(100) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - started < 5
