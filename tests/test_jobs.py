"""Job record, state machine, token events, channels and liveness against a real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from queueing import events, jobs, keys, liveness
from queueing.channel import EventSubscription
from queueing.jobs import CHAT, JobRecord, JobRequest, JobStatus, TransitionRefused

TTL = 600
REQUEST = JobRequest(CHAT, "m", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 8, "temperature": 0.2, "stop": ["\n"], "seed": 3,
                                 "response_format": {"type": "json_object"}, "n": 2})


@pytest.fixture(autouse=True)
def test_worker_looks_alive(redis_client: redis.Redis) -> Iterator[None]:
    """Jobs these tests move to RUNNING on "w1" must not be reaped by the session's real workers."""
    liveness.beat(redis_client, "m", "w1", 600)
    yield
    liveness.retire(redis_client, "m", "w1")


def make_job(client: redis.Redis, status: JobStatus = JobStatus.QUEUED) -> str:
    job_id = jobs.new_job_id()
    jobs.create(client, JobRecord(id=job_id, request=REQUEST, status=status), TTL)
    return job_id


@pytest.fixture
def cancel_pubsub(redis_client: redis.Redis) -> Iterator[Any]:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.CANCEL_CHANNEL)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    yield pubsub
    pubsub.close()


def next_message(pubsub: Any, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        msg = pubsub.get_message(timeout=remaining)
        if msg and msg["type"] == "message":
            return msg  # type: ignore[no-any-return]
    return None


# --- events -----------------------------------------------------------------


@pytest.mark.parametrize("event", [
    events.Delta("héllo\n".encode()),
    events.Delta(b""),
    events.Delta(b"d3 data: x", tokens=12),
    events.Delta('data: {"choices":[{"index":0,"delta":{"content":"é"}}]}\n\n'.encode(), tokens=2),
    events.Done(events.Usage(5, 8)),
    events.Done(events.Usage(5, 8), body='{"id": "chatcmpl-1", "choices": []}'),
    events.Error("bad prompt", status=400, error_type="invalid_request_error", code="too_long",
                 param="messages", usage=events.Usage(2, 0)),
    events.Cancelled(events.Usage(4, 1)),
])
def test_event_round_trip(event: events.TokenEvent) -> None:
    decoded = events.decode(events.encode(event))
    assert decoded == event
    assert type(decoded) is type(event)
    assert events.is_terminal(decoded) is not isinstance(event, events.Delta)


@pytest.mark.parametrize("raw", [b"d", b"dx y", b"d-", b"{", b"[]", b'{"type":"nope"}', b""])
def test_a_malformed_event_is_refused(raw: bytes) -> None:
    with pytest.raises(events.EventDecodeError):
        events.decode(raw)


def test_decoded_usage_total() -> None:
    done = events.decode(events.encode(events.Done(events.Usage(3, 4))))
    assert isinstance(done, events.Done) and done.usage.total_tokens == 7


@pytest.mark.parametrize("raw", ["not json", "{}", '{"type": "delta"}',
                                 '{"type": "nope", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
                                 '{"type": "done", "body": "{}"}', "[1]", "5", "null", '"x"',
                                 # the old contract's done event (finish_reason) is not one any more
                                 '{"type": "done", "finish_reason": "stop",'
                                 ' "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'])
def test_decode_garbage_raises(raw: str) -> None:
    with pytest.raises(events.EventDecodeError):
        events.decode(raw)


# --- job record -------------------------------------------------------------


def test_create_get_round_trip(redis_client: redis.Redis) -> None:
    job_id = make_job(redis_client)
    record = jobs.get(redis_client, job_id)
    assert record is not None
    assert record.id == job_id
    assert record.request == REQUEST
    assert record.status is JobStatus.QUEUED
    assert record.started_at is None and record.worker is None
    assert 0 < redis_client.ttl(keys.job(job_id)) <= TTL


def test_request_body_round_trips_untouched(redis_client: redis.Redis) -> None:
    body = {"model": "m", "input": "héllo ☃", "stream": True, "frobnicate": [1, {"x": None}],
            "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    request = JobRequest(jobs.RESPONSES, "m", body)
    assert JobRequest.from_dict(request.to_dict()) == request
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, request=request), TTL)
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.request == request and record.request.body == body
    assert record.request.stream is True


@pytest.mark.parametrize(("stream", "expected"), [(True, True), (False, False), (None, False), (1, False),
                                                  ("true", False)])
def test_request_streams_only_for_true(stream: Any, expected: bool) -> None:
    """``parse_job_request`` normalizes ``"stream"`` before a job is made; the job reads it strictly."""
    assert JobRequest(CHAT, "m", {"model": "m", "stream": stream}).stream is expected
    assert JobRequest(CHAT, "m", {"model": "m"}).stream is False


def test_get_missing_is_none(redis_client: redis.Redis) -> None:
    assert jobs.get(redis_client, jobs.new_job_id()) is None


# --- transitions ------------------------------------------------------------


def test_queued_to_running_sets_fields(redis_client: redis.Redis) -> None:
    job_id = make_job(redis_client)
    prev = jobs.transition(redis_client, job_id, JobStatus.RUNNING, TTL, model="m", worker="w1",
                           started_at=12.5)
    assert prev is JobStatus.QUEUED
    record = jobs.get(redis_client, job_id)
    assert record is not None
    assert (record.status, record.worker, record.started_at) == (JobStatus.RUNNING, "w1", 12.5)


@pytest.mark.parametrize("terminal", sorted(jobs.TERMINAL_STATUSES))
def test_terminal_states_refuse_everything(redis_client: redis.Redis, terminal: JobStatus) -> None:
    job_id = make_job(redis_client, terminal)
    for target in JobStatus:
        with pytest.raises(TransitionRefused) as exc:
            jobs.transition(redis_client, job_id, target, TTL, model="m", worker="w1")
        assert exc.value.current is terminal
    assert jobs.get(redis_client, job_id).status is terminal  # type: ignore[union-attr]


def test_missing_job_refused(redis_client: redis.Redis) -> None:
    job_id = jobs.new_job_id()
    with pytest.raises(TransitionRefused) as exc:
        jobs.transition(redis_client, job_id, JobStatus.RUNNING, TTL, model="m", worker="w1")
    assert exc.value.current is None
    assert not redis_client.exists(keys.job(job_id))


def test_transition_publishes_in_same_step(redis_client: redis.Redis) -> None:
    job_id = make_job(redis_client, JobStatus.RUNNING)
    done = events.Done(events.Usage(2, 3), body="{}")
    with EventSubscription(redis_client, job_id) as sub:
        jobs.transition(redis_client, job_id, JobStatus.SUCCEEDED, TTL, publish=events.encode(done),
                        result="ok")
        assert sub.next_event(timeout=1) == done
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.result == "ok"


def test_refused_transition_publishes_nothing(redis_client: redis.Redis) -> None:
    job_id = make_job(redis_client, JobStatus.FAILED)
    with EventSubscription(redis_client, job_id) as sub:
        with pytest.raises(TransitionRefused):
            jobs.transition(redis_client, job_id, JobStatus.SUCCEEDED, TTL,
                            publish=events.encode(events.Done(events.Usage(1, 1))))
        assert sub.next_event(0.3) is None


def test_only_from_narrows_sources(redis_client: redis.Redis) -> None:
    job_id = make_job(redis_client, JobStatus.RUNNING)
    with pytest.raises(TransitionRefused):
        jobs.transition(redis_client, job_id, JobStatus.FAILED, TTL, only_from=JobStatus.QUEUED)
    assert jobs.transition(redis_client, job_id, JobStatus.FAILED, TTL,
                           only_from=JobStatus.RUNNING) is JobStatus.RUNNING


def test_transitions_table() -> None:
    assert set(jobs.TRANSITIONS) == set(JobStatus)
    for status in jobs.TERMINAL_STATUSES:
        assert status.is_terminal
        assert jobs.TRANSITIONS[status] == frozenset()
    for status in set(JobStatus) - jobs.TERMINAL_STATUSES:
        assert not status.is_terminal and jobs.TRANSITIONS[status]
    assert JobStatus.QUEUED.value not in jobs.allowed_sources(JobStatus.QUEUED)
    assert jobs.allowed_sources(JobStatus.RUNNING) == ["queued"]
    assert jobs.allowed_sources(JobStatus.QUEUED) == ["running"]  # a requeue (queueing.recovery)


def test_transition_leaves_the_requeue_to_recovery(redis_client: redis.Redis) -> None:
    """RUNNING -> QUEUED is legal, but only queueing.recovery's script makes it."""
    assert JobStatus.QUEUED in jobs.TRANSITIONS[JobStatus.RUNNING]
    job_id = make_job(redis_client, JobStatus.RUNNING)
    with pytest.raises(TransitionRefused) as exc:
        jobs.transition(redis_client, job_id, JobStatus.QUEUED, TTL)
    assert exc.value.current is JobStatus.RUNNING
    assert jobs.get(redis_client, job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]


def test_job_scripts_take_the_hash_layout_from_the_record() -> None:
    assert jobs.job_script("redis.call('HGET', KEYS[1], '$quota_key') == '$RUNNING'") == (
        "redis.call('HGET', KEYS[1], 'quota_key') == 'running'")
    with pytest.raises(KeyError, match="no_such_field"):
        jobs.job_script("redis.call('HGET', KEYS[1], '$no_such_field')")


def test_no_lua_script_spells_a_job_field() -> None:
    """Every field a script reads or writes on the job hash (KEYS[1]) is a ``$name`` of ``JobRecord``."""
    import inspect
    import re

    from queueing import metering, recovery

    calls = 0
    for module in (jobs, metering, recovery):
        for args in re.findall(r"redis\.call\('H[A-Z]+', KEYS\[1\],([^)]*)\)", inspect.getsource(module)):
            calls += 1
            literals = re.findall(r"'([^']*)'", args)
            assert all(literal.startswith("$") for literal in literals), (module.__name__, args)
    assert calls >= 10


# --- cancellation -----------------------------------------------------------


def test_cancel_queued_job(redis_client: redis.Redis, cancel_pubsub: Any) -> None:
    job_id = make_job(redis_client)
    assert jobs.request_cancel(redis_client, job_id, TTL) is JobStatus.QUEUED
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.CANCELLED
    assert record.finished_at is not None
    assert next_message(cancel_pubsub, 0.3) is None


def test_cancel_running_job_asks_workers(redis_client: redis.Redis, cancel_pubsub: Any) -> None:
    job_id = make_job(redis_client, JobStatus.RUNNING)
    assert jobs.request_cancel(redis_client, job_id, TTL) is JobStatus.RUNNING
    assert jobs.get(redis_client, job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    msg = next_message(cancel_pubsub, 1)
    assert msg is not None and msg["channel"] == keys.CANCEL_CHANNEL and msg["data"] == job_id


def test_cancel_missing_and_finished_jobs(redis_client: redis.Redis, cancel_pubsub: Any) -> None:
    assert jobs.request_cancel(redis_client, jobs.new_job_id(), TTL) is None
    done_id = make_job(redis_client, JobStatus.SUCCEEDED)
    assert jobs.request_cancel(redis_client, done_id, TTL) is JobStatus.SUCCEEDED
    assert jobs.get(redis_client, done_id).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert next_message(cancel_pubsub, 0.3) is None


# --- liveness ---------------------------------------------------------------


def test_liveness_beat_count_retire(redis_client: redis.Redis) -> None:
    model = f"model-{jobs.new_job_id()}"
    assert liveness.live_models(redis_client)[model] == 0
    liveness.beat(redis_client, model, "w1", 5)
    assert liveness.live_models(redis_client)[model] == 1
    liveness.beat(redis_client, model, "w1", 5)  # a refresh is not a second worker
    liveness.beat(redis_client, model, "w2", 5)
    assert liveness.live_models(redis_client)[model] == 2
    liveness.retire(redis_client, model, "w1")
    assert liveness.live_models(redis_client)[model] == 1
    liveness.retire(redis_client, model, "w2")
    assert model not in liveness.live_models(redis_client)


def test_liveness_expires(redis_client: redis.Redis) -> None:
    model = f"model-{jobs.new_job_id()}"
    liveness.beat(redis_client, model, "w1", 0.2)
    assert liveness.live_models(redis_client)[model] == 1
    time.sleep(0.4)
    assert model not in liveness.live_models(redis_client)  # hidden from readers at once...
    liveness.beat(redis_client, f"other-{model}", "w2", 5)
    assert redis_client.zscore(keys.LIVE_WORKERS, f"{model}\tw1") is None  # ...pruned by the next beat


def test_create_refuses_an_existing_id_and_reserves_nothing(redis_client: redis.Redis) -> None:
    job_id = jobs.new_job_id()
    quota = keys.quota("k-exists", "2026-01-01")
    record = JobRecord(id=job_id, request=REQUEST, key_id="k-exists", quota_key=quota, quota_limit=1000,
                       reserved_tokens=40)
    jobs.create(redis_client, record, TTL, seed_used=0)
    with pytest.raises(jobs.JobExists):
        jobs.create(redis_client, record, TTL, seed_used=0)
    assert redis_client.hget(quota, "reserved") == "40"
    redis_client.delete(quota)
