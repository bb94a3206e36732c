"""DeltaPublisher against a real Redis: one thread publishes every job's deltas, in order."""

from __future__ import annotations

import threading

import redis
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry

from queueing import events, keys
from tests.conftest import free_port
from workers.publisher import DeltaPublisher


def _subscribe(client: redis.Redis, *job_ids: str) -> redis.client.PubSub:
    pubsub = client.pubsub()
    pubsub.subscribe(*(keys.job_events(job_id) for job_id in job_ids))
    for _ in job_ids:
        message = pubsub.get_message(timeout=2)
        assert message is not None and message["type"] == "subscribe"
    return pubsub


def _received(pubsub: redis.client.PubSub) -> dict[str, list[events.Delta]]:
    out: dict[str, list[events.Delta]] = {}
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        event = events.decode(message["data"])
        assert isinstance(event, events.Delta)
        out.setdefault(message["channel"], []).append(event)
    return out


def _round_trips() -> float:
    return REGISTRY.get_sample_value("inferq_worker_publish_seconds_count") or 0.0


def test_every_jobs_deltas_arrive_in_order_and_flush_waits_for_them(redis_client: redis.Redis) -> None:
    jobs = [f"pub-{i}" for i in range(20)]
    pubsub = _subscribe(redis_client, *jobs)
    publisher = DeltaPublisher(redis_client)
    round_trips = _round_trips()

    def job(job_id: str) -> None:
        for i in range(50):
            publisher.send(job_id, events.Delta(b"data: %d\n\n" % i, 1))
        assert publisher.flush(job_id)

    threads = [threading.Thread(target=job, args=(job_id,)) for job_id in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    received = _received(pubsub)
    for job_id in jobs:
        deltas = received[keys.job_events(job_id)]
        assert b"".join(d.frames for d in deltas) == b"".join(b"data: %d\n\n" % i for i in range(50))
        assert sum(d.tokens for d in deltas) == 50
    messages = sum(len(d) for d in received.values())
    assert messages < 20 * 50  # a job's deltas that were ready together went out as one message
    assert _round_trips() - round_trips < messages  # and several jobs' messages in one round trip
    publisher.stop()


def test_several_jobs_in_one_round_trip_keep_their_channels_and_order(redis_client: redis.Redis) -> None:
    jobs = [f"pub-many-{i}" for i in range(4)]
    pubsub = _subscribe(redis_client, *jobs)
    publisher = DeltaPublisher(redis_client)
    evals = redis_client.info("commandstats").get("cmdstat_eval", {}).get("calls", 0)
    # Redis holds every command for 0.5 s: the first delta's round trip waits, and the deltas
    # sent meanwhile wait for the next one (or all go in the first, if the thread was slower)
    redis_client.execute_command("CLIENT", "PAUSE", 500, "ALL")
    publisher.send(jobs[0], events.Delta(b"data: 0\n\n", 1))
    for i in range(1, 4):
        for job_id in jobs:
            publisher.send(job_id, events.Delta(b"data: %d\n\n" % i, 1))
    assert all(publisher.flush(job_id) for job_id in jobs)
    received = _received(pubsub)
    assert redis_client.info("commandstats")["cmdstat_eval"]["calls"] == evals + 1
    for job_id in jobs:
        deltas = received[keys.job_events(job_id)]
        start = 0 if job_id == jobs[0] else 1
        assert b"".join(d.frames for d in deltas) == b"".join(b"data: %d\n\n" % i for i in range(start, 4))
        assert len(deltas) <= 2
    publisher.stop()


def test_a_delta_is_published_without_waiting_for_a_flush(redis_client: redis.Redis) -> None:
    pubsub = _subscribe(redis_client, "pub-now")
    publisher = DeltaPublisher(redis_client)
    publisher.send("pub-now", events.Delta(b"data: x\n\n", 1))
    message = pubsub.get_message(timeout=2)
    assert message is not None and events.decode(message["data"]) == events.Delta(b"data: x\n\n", 1)
    publisher.stop()


def test_when_redis_fails_the_job_is_reported_and_its_flush_fails() -> None:
    # nothing listens there; no retries
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    failed: list[str] = []
    publisher = DeltaPublisher(dead, on_failure=failed.append)
    publisher.send("pub-lost", events.Delta(b"data: x\n\n", 1))
    assert publisher.flush("pub-lost", timeout=10) is False
    assert failed == ["pub-lost"]
    publisher.send("pub-lost", events.Delta(b"data: y\n\n", 1))  # after its flush: a new start
    assert publisher.flush("pub-lost", timeout=10) is False
    publisher.stop()
