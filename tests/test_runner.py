"""JobRunner against a real Redis with the scripted engine (a test double)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from queueing import events, jobs, keys, liveness, metering, recovery
from queueing.jobs import COMPLETIONS, JobRecord, JobRequest, JobStatus
from workers.runner import JobRunner
from workers.scripted_engine import ScriptedEngine

TTL = 600
FAKE_WORKERS = ("w-test", "w-slow", "w-dead")


def completion(prompt: str, **fields: Any) -> JobRequest:
    return JobRequest(COMPLETIONS, "m", {"model": "m", "prompt": prompt, **fields})


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

    def stream(self, job_id: str, request: JobRequest, emit: Any = None, admit: Any = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        assert self.runner.cancel(job_id)  # accepted although the engine has not started it
        return super().stream(job_id, request, emit, admit, priority)


@pytest.mark.parametrize("stream", [True, False])  # a buffered job publishes nothing before its end
def test_cancel_before_the_engine_registers_the_request(redis_client: redis.Redis, stream: bool) -> None:
    engine = CancelBeforeRegistration(token_delay=0.05)
    runner = engine.runner = JobRunner(engine, redis_client, "w-test", TTL)
    request = completion("go", max_tokens=200, stream=stream)
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, request=request), TTL)
    runner.run(job_id, request)
    record = jobs.get(redis_client, job_id)
    assert record is not None
    assert record.status is JobStatus.CANCELLED
    assert record.completion_tokens is not None and record.completion_tokens < 200


def test_cancel_of_a_job_not_running_here_is_refused(redis_client: redis.Redis) -> None:
    runner = JobRunner(ScriptedEngine(), redis_client, "w-test", TTL)
    assert runner.cancel(jobs.new_job_id()) is False


def _metered_job(client: redis.Redis, request: JobRequest, reserve: int = 500) -> tuple[str, str]:
    job_id = jobs.new_job_id()
    quota = keys.quota(f"k-{job_id}", "2026-01-01")
    record = JobRecord(id=job_id, request=request, key_id=f"k-{job_id}", quota_key=quota,
                       quota_day="2026-01-01", quota_limit=10_000, reserved_tokens=reserve)
    jobs.create(client, record, TTL, seed_used=0)
    return job_id, quota


def _quota(client: redis.Redis, quota: str) -> tuple[int, int]:
    used, reserved = client.hmget(quota, "used", "reserved")
    return int(used or 0), int(reserved or 0)


@pytest.mark.parametrize("stream", [True, False])
def test_cancel_arriving_right_after_the_running_transition_is_kept(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
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
    request = completion("go", max_tokens=200, stream=stream)
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, request=request), TTL)
    runner.run(job_id, request)
    record = jobs.get(redis_client, job_id)
    assert accepted == [True]
    assert record is not None and record.status is JobStatus.CANCELLED
    assert record.completion_tokens is not None and record.completion_tokens < 200


def test_engine_failure_mid_stream_settles_what_was_generated(redis_client: redis.Redis) -> None:
    runner = JobRunner(ScriptedEngine(), redis_client, "w-test", TTL)
    request = completion("one two [[fail_after=3]]", max_tokens=50, stream=True)
    job_id, quota = _metered_job(redis_client, request)
    runner.run(job_id, request)
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert (record.prompt_tokens, record.completion_tokens) == (3, 3)
    assert record.error_code == "engine_error"
    assert _quota(redis_client, quota) == (6, 0)
    entries = [e for _, e in redis_client.xrange(keys.USAGE_STREAM) if e["job_id"] == job_id]
    assert [(e["prompt_tokens"], e["completion_tokens"]) for e in entries] == [("3", "3")]


def test_worker_lost_settles_the_admitted_prompt_and_the_streamed_tokens(redis_client: redis.Redis) -> None:
    job_id, quota = _metered_job(redis_client, completion("a b c d", max_tokens=50))
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
    job_id = jobs.new_job_id()
    jobs.create(redis_client, JobRecord(id=job_id, request=completion("hi", max_tokens=2)), TTL)
    jobs.transition(redis_client, job_id, JobStatus.RUNNING, TTL, model="m", worker="w-slow")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.job_events(job_id))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    assert recovery.fail_running(redis_client, job_id, recovery.WORKER_LOST, TTL)
    runner.finish(job_id, events.Done(usage=events.Usage(1, 2), body='{"choices":[]}'))
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

    def stream(self, job_id: str, request: JobRequest, emit: Any = None, admit: Any = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        self.priorities[job_id] = priority
        yield from super().stream(job_id, request, emit, admit, priority)


def test_batch_work_reaches_the_engine_behind_interactive_work(redis_client: redis.Redis) -> None:
    """vLLM's priority scheduler runs lower values first: chat at 0, batch lines at 1."""
    engine = RecordingPriorities()
    runner = JobRunner(engine, redis_client, "w-test", TTL)
    request = completion("go", max_tokens=2)
    chat_id, batch_id = jobs.new_job_id(), jobs.new_job_id()
    for job_id in (chat_id, batch_id):
        jobs.create(redis_client, JobRecord(id=job_id, request=request), TTL)
    runner.run(chat_id, request)
    runner.run_batch(batch_id, request.to_dict(), {"request_id": "r-1"})
    assert engine.priorities == {chat_id: 0, batch_id: 1}


class Scripted:
    """A fake engine on the new Engine protocol: it asks ``admit`` once (as vLLM's serving layer
    does before the engine sees a prompt), then yields the events it is given."""

    def __init__(self, *script: events.TokenEvent, admit_with: tuple[int, int] | None = None) -> None:
        self.script = script
        self.admit_with = admit_with

    def stream(self, job_id: str, request: JobRequest, emit: Any = None, admit: Any = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        if self.admit_with is not None and admit is not None:
            refusal = admit(*self.admit_with)
            if refusal is not None:
                yield refusal
                return
        yield from self.script

    def models(self) -> list[dict[str, Any]]:
        return [{"id": "m", "object": "model", "created": 0, "owned_by": "test", "root": "m",
                 "max_model_len": 2048}]

    def abort(self, job_id: str) -> bool:
        return False

    def shutdown(self) -> None:
        pass


def _run_subscribed(client: redis.Redis, engine: Scripted, job_id: str,
                    request: JobRequest) -> list[events.TokenEvent]:
    """Run the job on ``engine`` and return every event published on its channel."""
    pubsub = client.pubsub()
    pubsub.subscribe(keys.job_events(job_id))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    JobRunner(engine, client, "w-test", TTL).run(job_id, request)
    received = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        received.append(events.decode(message["data"]))
    pubsub.close()
    return received


def _joined(received: list[events.TokenEvent]) -> tuple[tuple[bytes, int], list[events.TokenEvent]]:
    """The deltas' frames and tokens joined (the publisher may merge deltas), and the other events."""
    deltas = [e for e in received if isinstance(e, events.Delta)]
    assert received[:len(deltas)] == deltas  # the deltas come first
    joined = (b"".join(d.frames for d in deltas), sum(d.tokens for d in deltas))
    return joined, received[len(deltas):]


CHUNK = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":%d,"text":"%b"}]}\n\n'


def test_stream_frames_go_out_untouched_and_usage_settles_from_done(redis_client: redis.Redis) -> None:
    frames = [events.Delta(CHUNK % (0, b"a") + CHUNK % (1, b"b"), tokens=2),
              events.Delta(CHUNK % (0, b"c"), tokens=1), events.Delta(b"data: [DONE]\n\n")]
    done = events.Done(usage=events.Usage(4, 3))
    request = completion("x y z w", max_tokens=2, n=2, stream=True)
    job_id, quota = _metered_job(redis_client, request)
    received = _run_subscribed(redis_client, Scripted(*frames, done, admit_with=(4, 4)), job_id, request)
    assert _joined(received) == _joined([*frames, done])  # deltas ready together go out as one
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    assert (record.prompt_tokens, record.completion_tokens, record.result) == (4, 3, None)
    assert _quota(redis_client, quota) == (7, 0)


def test_a_buffered_answer_is_the_job_result(redis_client: redis.Redis) -> None:
    body = '{"id":"cmpl-2","object":"text_completion","choices":[{"index":0,"text":"hi"}],"usage":{}}'
    done = events.Done(usage=events.Usage(2, 5), body=body)
    request = completion("a b", max_tokens=5)
    job_id, quota = _metered_job(redis_client, request)
    assert _run_subscribed(redis_client, Scripted(done), job_id, request) == [done]
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED and record.result == body
    assert (record.prompt_tokens, record.completion_tokens) == (2, 5)
    assert _quota(redis_client, quota) == (7, 0)


def test_a_request_vllm_refuses_fails_with_its_status_and_param(redis_client: redis.Redis) -> None:
    refused = events.Error("top_logprobs must be at most 20", status=400, error_type="BadRequestError",
                           param="top_logprobs")
    request = completion("a", logprobs=99)
    job_id, quota = _metered_job(redis_client, request)
    assert _run_subscribed(redis_client, Scripted(refused), job_id, request) == [refused]
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert (record.error, record.error_status, record.error_type) == (
        "top_logprobs must be at most 20", 400, "BadRequestError")
    assert _quota(redis_client, quota) == (0, 0)  # nothing ran, nothing is charged


def test_admission_at_the_engine_holds_the_exact_worst_case_or_refuses(redis_client: redis.Redis) -> None:
    request = completion("a", max_tokens=4000, n=3)
    job_id, quota = _metered_job(redis_client, request, reserve=500)  # the quota limit is 10_000
    received = _run_subscribed(redis_client, Scripted(admit_with=(100, 3 * 4000)), job_id, request)
    assert [(type(e), getattr(e, "code", None)) for e in received] == [(events.Error, "quota_exceeded")]
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED and record.error_status == 429
    assert _quota(redis_client, quota) == (0, 0)


def test_an_engine_that_raises_after_deltas_settles_their_tokens(redis_client: redis.Redis) -> None:
    class Breaks(Scripted):
        def stream(self, job_id: str, request: JobRequest, emit: Any = None, admit: Any = None,
                   priority: int = 0) -> Iterator[events.TokenEvent]:
            assert admit is not None and admit(5, 10) is None
            yield events.Delta(CHUNK % (0, b"a"), tokens=2)
            yield events.Delta(CHUNK % (1, b"b"), tokens=2)
            raise RuntimeError("engine core died at 10.0.0.7")

    request = completion("a b c d e", max_tokens=5, n=2, stream=True)
    job_id, quota = _metered_job(redis_client, request)
    received = _run_subscribed(redis_client, Breaks(), job_id, request)
    assert _joined(received)[0] == (CHUNK % (0, b"a") + CHUNK % (1, b"b"), 4)
    end = received[-1]
    assert isinstance(end, events.Error) and end.code == "engine_error" and "10.0.0.7" not in end.message
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED
    assert (record.prompt_tokens, record.completion_tokens) == (5, 4)
    assert _quota(redis_client, quota) == (9, 0)
