"""The broker's kombu transport keeps one Redis client per channel, and a task's message
shows the job id, never the prompt."""

from __future__ import annotations

import base64
import json

import redis

from config import Settings
from queueing import broker_transport, keys
from queueing.celery_app import enqueue_generation, make_celery

MODEL = "transport-model"


def test_a_channel_sends_with_one_client_and_the_url_stays_kombus(redis_url: str) -> None:
    celery = make_celery(Settings(_env_file=None, redis_url=redis_url))
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, broker_transport.Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        assert connection.as_uri().startswith("redis://")  # what Flower's broker view parses
        channel._disconnect_pools()  # after a fork: a new pool, and a new client over it
        with channel.conn_or_acquire() as third:
            assert third is not first and third.ping()


def test_a_task_message_names_the_job_not_the_prompt(redis_url: str, redis_client: redis.Redis) -> None:
    celery = make_celery(Settings(_env_file=None, redis_url=redis_url))
    queue = keys.model_queue(MODEL)
    redis_client.delete(queue)
    params = {"model": MODEL, "messages": [{"role": "user", "content": "a secret prompt"}]}
    for n in range(3):
        enqueue_generation(celery, f"job-{n}", params, MODEL, request_id=f"req-{n}")
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]
    assert [m["headers"]["id"] for m in reversed(messages)] == ["job-0", "job-1", "job-2"]
    headers = messages[0]["headers"]
    assert headers["argsrepr"] == "['job-2', ...]" and headers["kwargsrepr"] == "{'request_id': 'req-2', ...}"
    args, kwargs, _ = json.loads(base64.b64decode(messages[0]["body"]))
    assert args == ["job-2", params] and kwargs["request_id"] == "req-2"  # the worker still gets it all
    redis_client.delete(queue)
