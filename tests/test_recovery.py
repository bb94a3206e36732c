"""Orphaned jobs of dead workers (``queueing.recovery``) against a real Redis."""

from __future__ import annotations

import redis

from config import Settings
from queueing import events, jobs, keys, liveness, recovery
from queueing.celery_app import make_celery
from queueing.jobs import COMPLETIONS, JobRecord, JobRequest, JobStatus

TTL = 600
REQUEST = JobRequest(COMPLETIONS, "orphan-model", {"model": "orphan-model", "prompt": "hi", "max_tokens": 4})


def running_job(client: redis.Redis, worker: str, **fields: str) -> str:
    job_id = jobs.new_job_id()
    jobs.create(client, JobRecord(id=job_id, request=REQUEST, **fields), TTL)  # type: ignore[arg-type]
    jobs.transition(client, job_id, JobStatus.RUNNING, TTL, model=REQUEST.model, worker=worker)
    return job_id


def test_running_index_follows_the_state_machine(redis_client: redis.Redis) -> None:
    job_id = running_job(redis_client, "w-index")
    assert redis_client.hget(keys.RUNNING_JOBS, job_id) == "orphan-model\tw-index"
    jobs.transition(redis_client, job_id, JobStatus.SUCCEEDED, TTL)
    assert not redis_client.hexists(keys.RUNNING_JOBS, job_id)


def test_live_workers_jobs_are_left_alone(redis_client: redis.Redis, redis_url: str) -> None:
    liveness.beat(redis_client, REQUEST.model, "w-alive", 30)
    job_id = running_job(redis_client, "w-alive", endpoint="/v1/completions")
    recovery.reap(redis_client, make_celery(Settings(redis_url=redis_url)), TTL)
    assert jobs.get(redis_client, job_id).status is JobStatus.RUNNING  # type: ignore[union-attr]
    liveness.retire(redis_client, REQUEST.model, "w-alive")
    redis_client.hdel(keys.RUNNING_JOBS, job_id)


def test_a_dead_workers_stream_fails_with_worker_lost(redis_client: redis.Redis, redis_url: str) -> None:
    job_id = running_job(redis_client, "w-dead-1")
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.job_events(job_id))
    pubsub.get_message(timeout=1)
    requeued, failed = recovery.reap(redis_client, make_celery(Settings(redis_url=redis_url)), TTL)
    assert failed >= 1
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED and record.error_code == "worker_lost"
    message = pubsub.get_message(timeout=2)
    assert message is not None and isinstance(events.decode(message["data"]), events.Error)
    pubsub.close()


def test_a_dead_workers_job_is_requeued_then_given_up(redis_client: redis.Redis, redis_url: str) -> None:
    celery = make_celery(Settings(redis_url=redis_url))
    queue = keys.batch_queue(REQUEST.model)
    redis_client.delete(queue)
    job_id = running_job(redis_client, "w-dead-2", endpoint="/v1/completions")
    for attempt in range(1, recovery.MAX_ATTEMPTS + 1):
        assert recovery.reap(redis_client, celery, TTL)[0] >= 1
        record = jobs.get(redis_client, job_id)
        assert record is not None and (record.status, record.attempts, record.worker) == (
            JobStatus.QUEUED, attempt, None)
        assert redis_client.llen(queue) == attempt  # one fresh task message per requeue
        jobs.transition(redis_client, job_id, JobStatus.RUNNING, TTL, model=REQUEST.model,
                        worker=f"w-dead-2-{attempt}")  # taken, and that worker dies too
    recovery.reap(redis_client, celery, TTL)
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.FAILED and record.error_status == 500
    assert not redis_client.hexists(keys.RUNNING_JOBS, job_id)
    redis_client.delete(queue)


def test_a_requeue_is_a_move_of_the_table(redis_client: redis.Redis, redis_url: str, monkeypatch) -> None:
    """The requeue script takes the statuses it may requeue from out of ``jobs.TRANSITIONS``."""
    celery = make_celery(Settings(redis_url=redis_url))
    queue = keys.batch_queue(REQUEST.model)
    redis_client.delete(queue)
    job_id = running_job(redis_client, "w-dead-3", endpoint="/v1/completions")
    assert JobStatus.QUEUED in jobs.TRANSITIONS[JobStatus.RUNNING]
    monkeypatch.setitem(jobs.TRANSITIONS, JobStatus.RUNNING,
                        jobs.TRANSITIONS[JobStatus.RUNNING] - {JobStatus.QUEUED})
    assert recovery.reap(redis_client, celery, TTL) == (0, 0)
    record = jobs.get(redis_client, job_id)
    assert record is not None and record.status is JobStatus.RUNNING and record.attempts is None
    assert redis_client.llen(queue) == 0
    monkeypatch.undo()
    assert recovery.reap(redis_client, celery, TTL)[0] >= 1
    assert jobs.get(redis_client, job_id).status is JobStatus.QUEUED  # type: ignore[union-attr]
    jobs.transition(redis_client, job_id, JobStatus.CANCELLED, TTL)
    redis_client.delete(queue)
