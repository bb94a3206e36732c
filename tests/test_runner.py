"""JobRunner against a real Redis with the scripted engine (a test double)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis

from queueing import jobs
from queueing.jobs import GenerationParams, JobRecord, JobStatus
from workers.runner import JobRunner
from workers.scripted_engine import ScriptedEngine

TTL = 600


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
