"""Redis Sentinel (issue 14): every client follows a failover, and WAIT guards what the API accepts.

A real group (primary, replica, three sentinels: ``tests.sentinel_group``) per test; the
primary is SIGKILLed, as a dead host would be.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flower.utils.broker import Broker

from api.http.openapi import build_openapi
from config import Settings
from inferq import status
from queueing import events, jobs, keys, liveness, replication
from queueing.celery_app import make_celery
from queueing.connections import broker_settings, master_address, redis_client
from queueing.jobs import COMPLETIONS, JobRecord, JobRequest, JobStatus
from queueing.subscriber import subscriber_for
from tests.conftest import ROOT, free_port, wait_for
from tests.sentinel_group import SentinelGroup, sentinel_group, wait_replicated
from workers.runner import JobRunner
from workers.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with sentinel_group(tmp_path) as started:
        yield started


def settings_for(group: SentinelGroup, **extra: object) -> Settings:
    env = {name.lower(): value for name, value in group.env.items()}
    return Settings(_env_file=None, **{**env, **extra})  # type: ignore[arg-type]


def test_settings_name_the_sentinels_and_the_broker_uses_them() -> None:
    s = Settings(_env_file=None, redis_sentinels="10.0.0.1:26379,10.0.0.2", redis_sentinel_master="main",
                 redis_sentinel_password="s3cret", redis_password="p@ss", redis_url="redis://x:6379/2")
    assert s.sentinel_addresses == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
    url, options = broker_settings(s)
    assert url == "sentinel://:p%40ss@10.0.0.1:26379/2;sentinel://:p%40ss@10.0.0.2:26379/2"
    assert options["master_name"] == "main" and options["sentinel_kwargs"]["password"] == "s3cret"
    assert s.wait_replicas == 1
    single = Settings(_env_file=None, redis_url="redis://127.0.0.1:6379/0")
    assert broker_settings(single) == ("redis://127.0.0.1:6379/0", {})
    assert single.wait_replicas == 0
    with pytest.raises(ValueError, match="not host:port"):
        Settings(_env_file=None, redis_sentinels="10.0.0.1:port")


def test_clients_follow_a_failover(group: SentinelGroup) -> None:
    """Commands, pub/sub, the Celery broker and the rate limiter reach the new primary on their own."""
    from api.accounts.ratelimit import KeyRateLimiter

    settings = settings_for(group)
    client = redis_client(settings)
    assert master_address(client) == ("127.0.0.1", group.primary.port)
    client.set("before", "kept")
    assert replication.confirm(client, settings).acked == 1
    subscriber = subscriber_for(client)
    inbox = subscriber.subscribe(b"channel")
    client.publish("channel", "hello")
    assert inbox.get(5) == b"hello"
    celery = make_celery(settings)
    celery.send_task("inferq.test", args=[1], queue="sentinel-test")
    limiter = KeyRateLimiter(settings)
    assert limiter.hit_request("key", 100).allowed
    wait_replicated(group.primary.client())

    in_flight: list[object] = []  # a pipeline whose connection breaks under it reconnects to the new primary
    blocked = threading.Thread(target=lambda: in_flight.append(_blocking_pipeline(client)))
    blocked.start()
    time.sleep(0.5)

    killed = time.monotonic()
    old = group.primary.port
    group.primary.kill()
    assert client.get("before") == "kept"  # waits for the new primary (FailoverRetry), then reads it
    followed = time.monotonic() - killed
    new = group.wait_failed_over(old)
    assert master_address(client) == ("127.0.0.1", new)
    assert followed < 15, f"the client took {followed:.1f}s to reach the new primary"
    blocked.join(20)
    assert in_flight == [[None]], in_flight

    with pytest.raises(redis.ConnectionError):  # a subscription open at the kill ends, never hangs
        inbox.get(5)
    again = subscriber.subscribe(b"channel")  # a new link, to the primary the sentinels name now
    client.publish("channel", "after")
    assert again.get(5) == b"after"
    celery.send_task("inferq.test", args=[2], queue="sentinel-test")
    assert client.llen("sentinel-test") == 2  # the message sent before the kill, and this one
    flower = Broker(celery.connection().as_uri(include_password=True),  # as Flower's broker view builds it
                    broker_options=celery.conf.broker_transport_options)
    assert asyncio.run(flower.queues(["sentinel-test"]))[0]["messages"] == 2
    assert limiter.hit_request("key", 100).headers["x-ratelimit-remaining-requests"] == "98"
    assert int(redis.Redis(port=new).info("replication")["connected_slaves"]) == 0


def _blocking_pipeline(client: redis.Redis) -> object:
    pipe = client.pipeline(transaction=False)
    pipe.blpop(["nothing-comes"], timeout=2)
    try:
        return pipe.execute()
    except redis.RedisError as exc:
        return exc


def test_wait_counts_the_replicas_that_hold_the_last_write(group: SentinelGroup) -> None:
    settings = settings_for(group, redis_wait_timeout_ms=200)
    client = redis_client(settings)
    client.set("x", "1")
    since = replication.fence(client, settings)
    assert (since.acked, since.wanted, since.ok) == (1, 1, True)
    client.set("y", "2")
    assert replication.confirm(client, settings, since).ok
    group.replicas[0].kill()
    started = time.monotonic()
    short = replication.confirm(client, settings, since)
    assert (short.acked, short.wanted, short.ok, short.failed_over) == (0, 1, False, False)
    assert 0.15 < time.monotonic() - started < 2  # WAIT gave up after its timeout
    assert not replication.accepted(short, settings, "a test job")
    assert replication.accepted(short, settings_for(group, redis_wait_policy="warn"), "a test job")
    other = replication.Confirmation(1, 1, "another primary's replication id")
    assert replication.confirm(client, settings, other).failed_over  # a failover between fence and WAIT
    unguarded = settings_for(group, redis_wait_replicas=0)
    assert replication.confirm(redis_client(unguarded), unguarded).ok


def _running_job(client: redis.Redis, worker: str) -> str:
    """A metered job (its end appends a usage entry) that ``worker`` runs."""
    job_id = jobs.new_job_id()
    request = JobRequest(COMPLETIONS, "m", {"model": "m", "prompt": "end"})
    jobs.create(client, JobRecord(id=job_id, request=request, key_id=f"k-{job_id}"), 600)
    jobs.transition(client, job_id, JobStatus.RUNNING, 600, model="m", started_at=time.time(), worker=worker)
    return job_id


def _usage_entries(client: redis.Redis, job_id: str) -> int:
    entries: list[tuple[str, dict[str, str]]] = client.xrange(keys.USAGE_STREAM)  # type: ignore[assignment]
    return sum(fields.get("job_id") == job_id for _, fields in entries)


END = events.Done(usage=events.Usage(3, 4), body='{"choices":[]}')


def test_a_job_end_lost_in_a_failover_is_written_again_on_the_new_primary(
        group: SentinelGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's terminal transition reaches the primary but not its replica, and the primary
    dies before the WAIT: the replica promoted has the job still running (on a live worker, so
    the reaper would never end it). finish sees the new replication id and writes the end again."""
    settings = settings_for(group, redis_wait_timeout_ms=200)
    client = redis_client(settings)
    job_id = _running_job(client, "w-test")
    old = group.primary.port
    wait_replicated(group.primary.client())
    replica = group.replicas[0].client()
    replica.config_set("masterauth", "wrong")  # cut off below, it cannot resync: the end never gets there
    writes: list[tuple[tuple[str, int] | None, str]] = []
    real_transition = jobs.transition

    def transition_then_the_primary_dies(*args: object, **kwargs: object) -> JobStatus:
        """A spy (test double) around the real transition: the first one is cut off from the
        replica and followed by a SIGKILL of the primary, before finish's WAIT."""
        first = not writes
        if first:
            group.primary.client().client_kill_filter(_type="replica")
        where = master_address(client)
        try:
            previous = real_transition(*args, **kwargs)  # type: ignore[arg-type]
            writes.append((where, f"applied over {previous}"))
            return previous
        except jobs.TransitionRefused as refused:
            writes.append((where, f"refused: {refused.current}"))
            raise
        finally:
            if first:
                group.primary.kill()

    monkeypatch.setattr(jobs, "transition", transition_then_the_primary_dies)
    JobRunner(ScriptedEngine(), client, "w-test", 600, settings).finish(job_id, END)
    new = group.wait_failed_over(old)
    # The second write found the job running on the new primary: without it the end was lost.
    assert writes == [(("127.0.0.1", old), "applied over running"),
                      (("127.0.0.1", new), "applied over running")]
    record = jobs.get(redis.Redis(port=new, decode_responses=True), job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.completion_tokens == 4
    assert _usage_entries(redis.Redis(port=new, decode_responses=True), job_id) == 1


class FailoverBeforeTheWait:
    """A test double for ``replication.primary``: the first read returns a replication id the
    primary no longer has (as if a failover came between it and the WAIT, the end having
    reached the new primary anyway); before the re-apply, a listener subscribes (one that came
    to the new primary after the end was first published)."""

    def __init__(self, client: redis.Redis, job_id: str):
        self.job_id, self.calls, self.listener = job_id, 0, client.pubsub()

    def __call__(self, client: redis.Redis, settings: Settings) -> replication.Confirmation:
        self.calls += 1
        if self.calls == 1:
            return replication.Confirmation(1, 1, "the old primary's replication id")
        self.listener.subscribe(keys.job_events(self.job_id))
        assert self.listener.get_message(timeout=2)["type"] == "subscribe"
        return replication.Confirmation(1, 1, client.info("replication")["master_replid"])


def test_a_job_end_the_new_primary_has_is_published_again_not_settled_again(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(_env_file=None, redis_url=redis_url, redis_wait_replicas=1, redis_wait_timeout_ms=50)
    client = redis_client(settings)
    liveness.beat(client, "m", "w-end", 600)  # a session worker's reaper must not end the job meanwhile
    try:
        job_id = _running_job(client, "w-end")
        double = FailoverBeforeTheWait(client, job_id)
        monkeypatch.setattr(replication, "primary", double)
        JobRunner(ScriptedEngine(), client, "w-end", 600, settings).finish(job_id, END)
    finally:
        liveness.retire(client, "m", "w-end")
    assert double.calls == 2  # written, then written again: refused as already succeeded, which is fine
    message = double.listener.get_message(timeout=2)
    assert message is not None and events.decode(message["data"]) == END
    record = jobs.get(client, job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    assert _usage_entries(client, job_id) == 1  # settled once


def test_inferq_status_reads_the_primary_the_sentinels_name(group: SentinelGroup, tmp_path: Path) -> None:
    """``inferq status`` follows REDIS_SENTINELS (REDIS_URL names only the database here), after a
    failover too."""
    settings = settings_for(group, database_url=f"sqlite:///{tmp_path / 'none.db'}")
    client = redis_client(settings)
    liveness.beat(client, "m", "w-status", 60)
    wait_replicated(group.primary.client())
    nowhere = f"http://127.0.0.1:{free_port()}"
    report = status.collect(settings, nowhere, nowhere)
    assert report["redis"]["reachable"], report["redis"]
    assert f"at 127.0.0.1:{group.primary.port} (sentinels " in report["redis"]["url"]
    assert [w["id"] for w in report["workers"]] == ["w-status"]
    old = group.primary.port
    group.primary.kill()
    new = group.wait_failed_over(old)
    report = status.collect(settings, nowhere, nowhere)
    assert report["redis"]["reachable"] and f"at 127.0.0.1:{new} " in report["redis"]["url"], report["redis"]
    assert [w["id"] for w in report["workers"]] == ["w-status"] and status.problem(report) is None


def test_openapi_lists_the_503_the_wait_policy_gives_where_it_can() -> None:
    document = build_openapi(Settings(_env_file=None))
    for path in ("/v1/jobs", "/v1/batches"):
        operation = document["paths"][path]["post"]
        assert "503" in operation["responses"] and "`replication_unavailable`" in operation["description"]
    assert "`replication_unavailable`" in document["components"]["responses"]["503"]["description"]


def test_the_compose_sentinel_profile_starts_a_group_inferq_reaches(tmp_path: Path) -> None:
    """compose.yaml's replica and sentinel commands, run here (compose service names replaced by
    local ports): the sentinels accept their config, require the password, and follow the primary;
    inferq's clients and Celery reach the primary through them with both passwords."""
    from tests.compose_files import FAKE_SECRETS, deployed

    services = deployed()["services"]
    assert {name for name, s in services.items() if s.get("profiles") == ["sentinel"]} == {
        "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    password = FAKE_SECRETS["REDIS_PASSWORD"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        primary, replica = free_port(), free_port()
        procs.append(_start(["redis-server", "--port", str(primary), "--save", "", "--requirepass", password,
                             "--masterauth", password], primary, password))
        argv = [_local(arg, primary) for arg in services["redis-replica"]["command"]]
        argv[argv.index("--appendonly") + 1] = "no"
        at = argv.index("--replicaof")
        assert argv[at + 1:at + 3] == ["redis", "6379"]
        argv[at + 1:at + 3] = ["127.0.0.1", str(primary)]
        procs.append(_start([*argv, "--port", str(replica), "--dir", str(tmp_path)], replica, password))
        sentinels = []
        for n in (1, 2, 3):
            service = services[f"sentinel-{n}"]
            assert service["entrypoint"] == ["sh", "-c"] and service["healthcheck"]["test"][0] == "CMD-SHELL"
            port = free_port()
            data = tmp_path / f"sentinel-{n}"
            data.mkdir()
            script = _local(service["command"][0], primary).replace("/data/", f"{data}/").replace(
                "port 26379", f"port {port}")
            env = {**os.environ, **service["environment"]}
            procs.append(_start(["sh", "-c", script], port, password, env=env))
            sentinels.append(port)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=sentinels[0]).execute_command("SENTINEL", "MASTERS")

        settings = Settings(_env_file=None, redis_url=f"redis://:{password}@redis:6379/0",
                            redis_sentinels=",".join(f"127.0.0.1:{p}" for p in sentinels),
                            redis_sentinel_master="inferq", redis_sentinel_password=password)
        client = redis_client(settings)
        wait_for(lambda: master_address(client) == ("127.0.0.1", primary), 20, "the sentinels")
        assert client.set("compose", "ok") and client.get("compose") == "ok"
        wait_for(lambda: replication.confirm(client, settings).ok, 20, "the replica in sync")
        with make_celery(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            assert connection.default_channel.client.ping()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _local(text: str, primary: int) -> str:
    """A compose command with the service names swapped for this host's addresses."""
    return text.replace("redis 6379", f"127.0.0.1 {primary}").replace("redis-replica", "127.0.0.1")


def _start(argv: list[str], port: int, password: str, env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: redis.Redis(port=port, password=password).ping(), 10, argv[0], proc)
    return proc


def test_inferq_run_with_sentinels_it_cannot_reach_stops_and_starts_no_private_redis(tmp_path: Path) -> None:
    env = {**os.environ, "REDIS_SENTINELS": f"127.0.0.1:{free_port()}", "REDIS_SENTINEL_MASTER": "inferq",
           "REDIS_FAILOVER_TIMEOUT": "1", "ENGINE": "scripted", "SERVED_MODEL_NAME": "sentinel-run",
           "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite"}
    env.pop("REDIS_URL", None)
    run = subprocess.run([sys.executable, "-m", "inferq.cli", "run", "--procfile", str(ROOT / "Procfile")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "no Redis primary 'inferq' through the sentinels" in run.stderr, run.stderr
    assert "private redis-server" not in run.stdout + run.stderr
