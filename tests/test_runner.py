"""JobRunner against a real Redis with the scripted engine (a test double)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from queueing import events, jobs, keys, liveness, metering, recovery
from queueing.jobs import GenerationParams, JobRecord, JobStatus
from workers.runner import JobRunner
from workers.scripted_engine import ScriptedEngine

TTL = 600
FAKE_WORKERS = ("w-test", "w-slow", "w-dead")


@pytest.fixture(autouse=True)
def fake_workers_look_alive(redis_client: redis.Redis) -> Iterator[None]:
    """The session's real workers reap RUNNING jobs whose worker has no heartbeat: these
    tests' jobs run on workers that exist only here, so they get heartbeats while they run."""
    for worker in FAKE_WORKERS:
        liveness.beat(redis_client, "m", worker, TTL)
    yield
    for worker in FAKE_WORKERS:
        liveness.retire(redis_client, "m", worker)


class CancelBeforeRegistration(ScriptedEngine):
    """Delivers a cancel in the window after the job turned RUNNING and before the
    engine knows the request, where ``engine.abort`` alone would find nothing."""

    runner: JobRunner

    def stream(self, request_id: str, params: GenerationParams, admit: Any = None,
               priority: int = 0) -> Iterator[Any]:
        assert self.runner.cancel(request_id)  # accepted although the engine has not started it
        yield from super().stream(request_id, params, admit, priority)


def test_cancel_before_the_engine_registers_the_request(redis_client: redis.Redis) -> None:
    engine = CancelBeforeRegistration(token_delay=0.05)
    runner = engine.runner = JobRunner(engine, redis_client, "w-test", TTL)
    params = GenerationParams(kind="completion", model="m", prompt="go", max_tokens=200)
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, params=params), TTL)
    runner.run(job_id, params)
    record = jobs.get(redis_client, job_id)
    assert record is not None
    assert record.status is JobStatus.CANCELLED
    assert record.completion_tokens is not None and record.completion_tokens < 200


def test_cancel_of_a_job_not_running_here_is_refused(redis_client: redis.Redis) -> None:
    runner = JobRunner(ScriptedEngine(), redis_client, "w-test", TTL)
    assert runner.cancel(jobs.new_job_id()) is False


def _metered_job(client: redis.Redis, params: GenerationParams, reserve: int = 500) -> tuple[str, str]:
    job_id = jobs.new_job_id()
    quota = keys.quota(f"k-{job_id}", "2026-01-01")
    record = JobRecord(id=job_id, params=params, key_id=f"k-{job_id}", quota_key=quota,
                       quota_day="2026-01-01", quota_limit=10_000, reserved_tokens=reserve)
    jobs.create(client, record, TTL, seed_used=0)
    return job_id, quota


def _quota(client: redis.Redis, quota: str) -> tuple[int, int]:
    used, reserved = client.hmget(quota, "used", "reserved")
    return int(used or 0), int(reserved or 0)


def test_cancel_arriving_right_after_the_running_transition_is_kept(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API sees RUNNING and publishes a cancel before the runner calls the engine."""
    runner = JobRunner(ScriptedEngine(token_delay=0.05), redis_client, "w-test", TTL)
    original = jobs.transition
    accepted: list[bool] = []

    def transition_then_cancel(client: Any, job_id: str, target: JobStatus, *args: Any, **kwargs: Any) -> Any:
        result = original(client, job_id, target, *args, **kwargs)
        if target is JobStatus.RUNNING:
            accepted.append(runner.cancel(job_id))
        return result

    monkeypatch.setattr(jobs, "transition", transition_then_cancel)
    params = GenerationParams(kind="completion", model="m", prompt="go", max_tokens=200)
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, params=params), TTL)
    runner.run(job_id, params)
    record = jobs.get(redis_client, job_id)
    assert accepted == [True]
    assert record is not None and record.status is JobStatus.CANCELLED
    assert record.completion_tokens is not None and record.completion_tokens < 200


def test_engine_failure_mid_stream_settles_what_was_generated(redis_client: redis.Redis) -> None:
    runner = JobRunner(ScriptedEngine(), redis_client, "w-test", TTL)
    params = GenerationParams(kind="completion", model="m", prompt="one two [[fail_after=3]]", max_tokens=50)
    job_id, quota = _metered_job(redis_client, params)
    runner.run(job_id, params)
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert (record.prompt_tokens, record.completion_tokens) == (3, 3)
    assert record.error_code == "engine_error"
    assert _quota(redis_client, quota) == (6, 0)
    entries = [e for _, e in redis_client.xrange(keys.USAGE_STREAM) if e["job_id"] == job_id]
    assert [(e["prompt_tokens"], e["completion_tokens"]) for e in entries] == [("3", "3")]


def test_worker_lost_settles_the_admitted_prompt_and_the_streamed_tokens(redis_client: redis.Redis) -> None:
    params = GenerationParams(kind="completion", model="m", prompt="a b c d", max_tokens=50)
    job_id, quota = _metered_job(redis_client, params)
    jobs.transition(redis_client, job_id, JobStatus.RUNNING, TTL, model="m", worker="w-dead")
    assert metering.adjust_reservation(redis_client, job_id, 7 + 50, prompt_tokens=7)
    assert recovery.fail_running(redis_client, job_id, recovery.WORKER_LOST, TTL, completion_tokens=2)
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert (record.prompt_tokens, record.completion_tokens) == (7, 2)
    assert _quota(redis_client, quota) == (9, 0)


def test_a_worker_finishing_a_job_the_api_already_failed_publishes_no_second_end(
        redis_client: redis.Redis) -> None:
    """Exactly one terminal event per job, even when a slow worker outlives its heartbeat."""
    runner = JobRunner(ScriptedEngine(), redis_client, "w-slow", TTL)
    params = GenerationParams(kind="completion", model="m", prompt="hi", max_tokens=2)
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, params=params), TTL)
    jobs.transition(redis_client, job_id, JobStatus.RUNNING, TTL, model="m", worker="w-slow")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.job_events(job_id))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    assert recovery.fail_running(redis_client, job_id, recovery.WORKER_LOST, TTL)
    runner.finish(job_id, events.Done(finish_reason="length", usage=events.Usage(1, 2)), "tok0 tok1")
    received = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        received.append(events.decode(message["data"]))
    pubsub.close()
    assert [type(e) for e in received] == [events.Error]
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED


class RecordingPriorities(ScriptedEngine):
    """Records the engine priority each request was submitted at."""

    def __init__(self) -> None:
        super().__init__()
        self.priorities: dict[str, int] = {}

    def stream(self, request_id: str, params: GenerationParams, admit: Any = None,
               priority: int = 0) -> Iterator[Any]:
        self.priorities[request_id] = priority
        yield from super().stream(request_id, params, admit, priority)


def test_batch_work_reaches_the_engine_behind_interactive_work(redis_client: redis.Redis) -> None:
    """vLLM's priority scheduler runs lower values first: chat at 0, batch lines at 1."""
    engine = RecordingPriorities()
    runner = JobRunner(engine, redis_client, "w-test", TTL)
    params = GenerationParams(kind="completion", model="m", prompt="go", max_tokens=2)
    chat_id, batch_id = jobs.new_job_id(), jobs.new_job_id()
    for job_id in (chat_id, batch_id):
        jobs.create(redis_client, JobRecord(id=job_id, params=params), TTL)
    runner.run(chat_id, params)
    runner.run_batch(batch_id, params.to_dict(), {"request_id": "r-1"})
    assert engine.priorities == {chat_id: 0, batch_id: 1}
