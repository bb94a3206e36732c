"""Job event subscriptions over one shared pub/sub connection per process, against a real Redis."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inferq.launcher import redis_server_argv
from queueing import events, keys, subscriber
from queueing.channel import EventSubscription, publish
from queueing.jobs import new_job_id
from tests.conftest import ROOT, free_port, wait_for


def delta(i: int) -> events.Delta:
    return events.Delta(f"data: {i}\n\n".encode(), tokens=1)


def subscribed_clients(client: redis.Redis) -> int:
    """Connections in subscribe mode."""
    return sum(1 for c in client.client_list() if int(c["sub"]) > 0)


def numsub(client: redis.Redis, job_id: str) -> int:
    return int(client.pubsub_numsub(keys.job_events(job_id))[0][1])


def test_an_event_published_right_after_subscribing_is_received(redis_client: redis.Redis) -> None:
    for _ in range(50):
        job_id = new_job_id()
        with EventSubscription(redis_client, job_id) as sub:
            publish(redis_client, job_id, delta(0))
            assert sub.next_event(1) == delta(0)


def test_next_event_times_out_with_none(redis_client: redis.Redis) -> None:
    with EventSubscription(redis_client, new_job_id()) as sub:
        started = time.monotonic()
        assert sub.next_event(0.2) is None
        assert sub.next_events(0.2) == []
        assert 0.35 < time.monotonic() - started < 1.5


def test_concurrent_subscriptions_share_one_connection_and_get_only_their_own_events(
        redis_client: redis.Redis) -> None:
    n_jobs, n_events = 40, 30
    job_ids = [new_job_id() for _ in range(n_jobs)]
    received: dict[str, list[events.TokenEvent]] = {}
    ready = threading.Barrier(n_jobs + 1)

    def listen(job_id: str) -> None:
        with EventSubscription(redis_client, job_id) as sub:
            ready.wait()
            got: list[events.TokenEvent] = []
            while not got or not events.is_terminal(got[-1]):
                got.extend(sub.next_events(5) if len(got) % 2 else [e for e in [sub.next_event(5)] if e])
            received[job_id] = got

    sentinel = EventSubscription(redis_client, new_job_id())  # this process's connection, subscribed
    before = subscribed_clients(redis_client)  # it, and other processes' (the session's workers)
    threads = [threading.Thread(target=listen, args=(j,)) for j in job_ids]
    for t in threads:
        t.start()
    ready.wait()
    assert subscribed_clients(redis_client) == before  # 40 more subscriptions, no more connections
    sentinel.close()
    pipe = redis_client.pipeline(transaction=False)
    for i in range(n_events):  # interleaved across jobs
        for n, job_id in enumerate(job_ids):
            pipe.publish(keys.job_events(job_id), events.encode(delta(n * 1000 + i)))
    for job_id in job_ids:
        pipe.publish(keys.job_events(job_id), events.encode(events.Done(events.Usage(1, n_events))))
    pipe.execute()
    for t in threads:
        t.join(10)
    for n, job_id in enumerate(job_ids):
        assert received[job_id] == [delta(n * 1000 + i) for i in range(n_events)] + [
            events.Done(events.Usage(1, n_events))]


def test_next_events_returns_everything_queued_in_order(redis_client: redis.Redis) -> None:
    job_id = new_job_id()
    with EventSubscription(redis_client, job_id) as sub:
        for i in range(5):
            publish(redis_client, job_id, delta(i))
        publish(redis_client, job_id, events.Cancelled())
        wait_for(lambda: numsub(redis_client, job_id) == 1, 2, "subscription")
        time.sleep(0.1)  # let the reader queue them all
        assert sub.next_event(1) == delta(0)
        assert sub.next_events(1) == [delta(i) for i in range(1, 5)] + [events.Cancelled()]
        assert sub.next_events(0.1) == []


def test_close_unsubscribes_and_later_events_are_dropped(redis_client: redis.Redis) -> None:
    job_id, other_id = new_job_id(), new_job_id()
    other = EventSubscription(redis_client, other_id)
    sub = EventSubscription(redis_client, job_id)
    assert numsub(redis_client, job_id) == 1
    sub.close()
    sub.close()  # idempotent
    wait_for(lambda: numsub(redis_client, job_id) == 0, 2, "unsubscribe")
    publish(redis_client, job_id, delta(1))  # nobody listens: dropped, and harmless
    publish(redis_client, other_id, delta(2))
    assert other.next_event(1) == delta(2)
    other.close()
    wait_for(lambda: numsub(redis_client, other_id) == 0, 2, "unsubscribe")
    link = subscriber.subscriber_for(redis_client)._link
    assert link is not None
    for channel in (keys.job_events(job_id).encode(), keys.job_events(other_id).encode()):
        assert channel not in link._routes and channel not in link._unanswered  # nothing left behind


def test_two_subscriptions_to_one_job_both_receive(redis_client: redis.Redis) -> None:
    job_id = new_job_id()
    first = EventSubscription(redis_client, job_id)
    second = EventSubscription(redis_client, job_id)
    assert numsub(redis_client, job_id) == 1  # one subscription in Redis, routed to both
    publish(redis_client, job_id, delta(1))
    assert first.next_event(1) == delta(1) and second.next_event(1) == delta(1)
    first.close()
    publish(redis_client, job_id, delta(2))
    assert second.next_event(1) == delta(2)
    assert numsub(redis_client, job_id) == 1
    second.close()
    wait_for(lambda: numsub(redis_client, job_id) == 0, 2, "unsubscribe")


def test_resubscribing_a_channel_being_unsubscribed(redis_client: redis.Redis) -> None:
    job_id = new_job_id()
    for i in range(30):  # UNSUBSCRIBE and SUBSCRIBE of one channel back to back
        EventSubscription(redis_client, job_id).close()
        with EventSubscription(redis_client, job_id) as sub:
            publish(redis_client, job_id, delta(i))
            assert sub.next_event(1) == delta(i)


def test_a_subscription_started_early_is_confirmed_later_and_misses_nothing(
        redis_client: redis.Redis) -> None:
    job_id, given_up = new_job_id(), new_job_id()
    pending = EventSubscription.start(redis_client, job_id)
    abandoned = EventSubscription.start(redis_client, given_up)
    assert redis_client.ping()  # the caller's other round trips, meanwhile
    abandoned.close()
    with pending.confirmed(2) as sub:
        assert numsub(redis_client, job_id) == 1
        publish(redis_client, job_id, delta(1))
        assert sub.next_event(1) == delta(1)
    wait_for(lambda: numsub(redis_client, given_up) == 0, 2, "unsubscribe of the abandoned one")


def unsubscribe_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_unsubscribe", {}).get("calls", 0))


def test_closed_channels_are_unsubscribed_together_within_the_delay(redis_client: redis.Redis) -> None:
    job_ids = [new_job_id() for _ in range(20)]
    subs = [EventSubscription(redis_client, job_id) for job_id in job_ids]
    before = unsubscribe_calls(redis_client)
    for sub in subs:
        sub.close()
    for job_id in job_ids:  # routing stops at once: a late event reaches no one
        publish(redis_client, job_id, delta(1))
    wait_for(lambda: all(numsub(redis_client, job_id) == 0 for job_id in job_ids),
             2 * subscriber.UNSUBSCRIBE_DELAY + 1, "unsubscribe")
    assert unsubscribe_calls(redis_client) - before <= 2  # one command for the 20 channels (two if split)
    with EventSubscription(redis_client, job_ids[0]) as again:  # after the UNSUBSCRIBE went out
        publish(redis_client, job_ids[0], delta(2))
        assert again.next_event(1) == delta(2)


def test_a_closed_channel_reopened_before_its_unsubscribe_keeps_its_subscription(
        redis_client: redis.Redis) -> None:
    job_id = new_job_id()
    EventSubscription(redis_client, job_id).close()
    with EventSubscription(redis_client, job_id) as sub:  # within UNSUBSCRIBE_DELAY: nothing sent
        time.sleep(2 * subscriber.UNSUBSCRIBE_DELAY)  # no stale UNSUBSCRIBE goes out later either
        assert numsub(redis_client, job_id) == 1
        publish(redis_client, job_id, delta(1))
        assert sub.next_event(1) == delta(1)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A redis-server this test may kill, stop and start again on the same port."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server: dict[str, object] = {"url": url}

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(redis_server_argv(port, tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: redis.Redis.from_url(url).ping(), 10, "redis-server", proc)
        server["proc"] = proc
        return proc

    server["start"] = start
    start()
    yield server
    proc = server["proc"]
    assert isinstance(proc, subprocess.Popen)
    proc.kill()
    proc.wait()


def test_a_redis_restart_fails_open_subscriptions_at_once_and_new_ones_work(own_redis: dict) -> None:
    client = redis.Redis.from_url(own_redis["url"], decode_responses=True)
    job_ids = [new_job_id() for _ in range(5)]
    subs = [EventSubscription(client, job_id) for job_id in job_ids]
    publish(client, job_ids[0], delta(0))
    errors: list[float] = []

    def wait_on(sub: EventSubscription) -> None:
        try:
            while True:
                sub.next_events(30)
        except redis.ConnectionError:
            errors.append(time.monotonic())

    waiters = [threading.Thread(target=wait_on, args=(s,)) for s in subs[1:]]
    for t in waiters:
        t.start()
    own_redis["proc"].kill()
    killed = time.monotonic()
    own_redis["proc"].wait()
    for t in waiters:
        t.join(5)
    assert len(errors) == 4 and max(errors) - killed < 1
    assert subs[0].next_event(1) == delta(0)  # what had arrived is still delivered, then the error
    with pytest.raises(redis.ConnectionError):
        subs[0].next_event(1)
    with pytest.raises(redis.ConnectionError):
        subs[0].next_event(1)  # and again
    with pytest.raises(redis.ConnectionError):
        EventSubscription(client, new_job_id())  # Redis is down: refused at once
    for sub in subs:
        sub.close()
    own_redis["start"]()
    job_id = new_job_id()
    with EventSubscription(client, job_id) as sub:
        publish(client, job_id, delta(1))
        assert sub.next_event(1) == delta(1)
        assert subscribed_clients(client) == 1


def test_a_silent_redis_fails_open_subscriptions(own_redis: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscriber, "SILENCE", 0.3)
    client = redis.Redis.from_url(own_redis["url"], decode_responses=True, db=1)  # a subscriber of its own
    sub = EventSubscription(client, new_job_id())
    proc = own_redis["proc"]
    proc.send_signal(signal.SIGSTOP)  # frozen: the connection stays open, nothing answers
    try:
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            sub.next_event(10)
        assert time.monotonic() - started < 2
    finally:
        proc.send_signal(signal.SIGCONT)
    sub.close()


def _subscribe_in_child(url: str, job_id: str, results: multiprocessing.Queue) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    with EventSubscription(client, job_id) as sub:
        publish(client, job_id, delta(7))
        results.put((sub.next_event(2), subscribed_clients(client)))


def test_a_forked_child_gets_a_subscriber_of_its_own(redis_url: str, redis_client: redis.Redis) -> None:
    with EventSubscription(redis_client, new_job_id()):  # the parent's subscriber is open
        before = subscribed_clients(redis_client)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=_subscribe_in_child, args=(redis_url, new_job_id(), results))
        child.start()
        event, during = results.get(timeout=10)
        child.join(10)
    assert event == delta(7) and during == before + 1


GEVENT_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys, threading, gevent, redis
from queueing import events, keys
from queueing.channel import EventSubscription
from queueing.connections import get_redis

client = get_redis(sys.argv[1])
def listen(n):
    with EventSubscription(client, f"gevent-{n}") as sub:
        got = []
        while not got or not events.is_terminal(got[-1]):
            got.extend(sub.next_events(5))
        return [e.tokens for e in got[:-1]]
def publish_all():
    for i in range(20):
        for n in range(50):
            client.publish(keys.job_events(f"gevent-{n}"), events.encode(events.Delta(b"x", tokens=i)))
        gevent.sleep(0)
    for n in range(50):
        client.publish(keys.job_events(f"gevent-{n}"), events.encode(events.Cancelled()))
listeners = [gevent.spawn(listen, n) for n in range(50)]
while client.pubsub_numsub(*[keys.job_events(f"gevent-{n}") for n in range(50)]) != [
        (keys.job_events(f"gevent-{n}"), 1) for n in range(50)]:
    gevent.sleep(0.01)
gevent.spawn(publish_all).join()
gevent.joinall(listeners, timeout=10)
assert all(g.value == list(range(20)) for g in listeners), [g.value for g in listeners]
reader = [t for t in threading.enumerate() if t.name == "inferq-pubsub"]
assert len(reader) == 1
print("ok", type(reader[0]).__module__)
"""


def test_works_under_gevent(redis_url: str) -> None:
    out = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, redis_url], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
