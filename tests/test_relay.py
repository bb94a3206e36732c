"""The stream relay: deltas written from the pub/sub reader straight to the client's socket
(``api.generation.relay``, ``api.http.socket_writer``).

The unit tests drive a :class:`Relay` by hand on a real subscription and a real socket pair;
the others go through gunicorn's gevent worker, where the relay is on for every stream: a client
that lags behind gets every frame in order and a well-framed response, and one that hangs up in
the middle of a stream cancels its job.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from api.generation.relay import Relay
from api.http.socket_writer import ChunkWriter
from queueing import events, jobs, keys
from queueing.channel import EventSubscription
from queueing.jobs import JobStatus
from tests.conftest import SCRIPTED_MODEL, TEST_KEY, start_api, wait_for
from tests.sse_client import frames


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%X\r\n%s\r\n" % (len(p), p) for p in parts)


def read_all(sock: socket.socket, size: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < size:
        out += sock.recv(size - len(out))
    return bytes(out)


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def subscription(redis_client: redis.Redis) -> Iterator[EventSubscription]:
    with EventSubscription(redis_client, f"relay-{uuid.uuid4().hex}") as sub:
        yield sub


def test_the_writer_frames_chunks_and_keeps_what_the_socket_does_not_take(sockets) -> None:
    server, client = sockets
    response = SimpleNamespace(sent=0)
    writer = ChunkWriter(server, response)
    assert writer.try_write(b"data: 1\n\n")
    big = bytes(range(256)) * 1024  # far over both buffers: most of it stays for flush
    assert not writer.try_write(big)
    expected = chunked(b"data: 1\n\n", big)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(read_all(client, len(expected))))
    reader.start()
    writer.flush()  # waits for the client to read
    reader.join(10)
    assert bytes(received) == expected
    assert response.sent == 9 + len(big)  # body bytes, as gunicorn counts them for its access log


def test_the_writer_raises_when_the_client_is_gone(sockets) -> None:
    server, client = sockets
    writer = ChunkWriter(server, SimpleNamespace(sent=0))
    client.close()
    with pytest.raises(OSError):
        for _ in range(3):
            writer.try_write(b"data: x\n\n")


def delta(text: str, tokens: int = 1) -> bytes:
    return events.encode(events.Delta(f"data: {text}\n\n".encode(), tokens))


def test_deltas_go_to_the_socket_and_the_end_to_the_queue(subscription, sockets) -> None:
    server, client = sockets
    relay = Relay(subscription, ChunkWriter(server, SimpleNamespace(sent=0)))
    relay.resume()
    assert relay.on
    relay.take(delta("a", 2))
    relay.take(events.encode(events.Delta(b"", 3)))  # progress: counted, nothing sent
    relay.take(delta("b"))
    done = events.encode(events.Done(events.Usage(1, 6)))
    relay.take(done)
    assert not relay.on  # from the end on, the reader queues everything, in order
    assert (relay.tokens, relay.deltas) == (6, 3)
    assert read_all(client, len(chunked(b"data: a\n\n", b"data: b\n\n"))) == chunked(b"data: a\n\n",
                                                                                     b"data: b\n\n")
    assert subscription.next_events(0) == [events.Done(events.Usage(1, 6))]


def test_a_full_socket_turns_the_relay_off_and_wakes_the_stream(subscription, sockets) -> None:
    server, client = sockets
    relay = Relay(subscription, ChunkWriter(server, SimpleNamespace(sent=0)))
    relay.resume()
    big = "x" * 200_000
    relay.take(delta(big))
    assert not relay.on
    started = time.monotonic()
    assert subscription.next_events(5) == []  # woken at once, nothing queued
    assert time.monotonic() - started < 1
    expected = chunked(f"data: {big}\n\n".encode())
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(read_all(client, len(expected))))
    reader.start()
    relay.catch_up()  # the stream's greenlet writes the rest, waiting for the client
    reader.join(10)
    assert bytes(received) == expected
    relay.resume()
    assert relay.on


def test_a_client_gone_is_raised_on_the_streams_side(subscription, sockets) -> None:
    server, client = sockets
    relay = Relay(subscription, ChunkWriter(server, SimpleNamespace(sent=0)))
    relay.resume()
    client.close()
    for i in range(3):
        if relay.on:
            relay.take(delta(str(i)))
    assert not relay.on
    with pytest.raises(OSError):
        relay.catch_up()
    relay.resume()  # a failed relay stays off
    assert not relay.on


def test_a_malformed_event_is_left_to_the_stream(subscription, sockets) -> None:
    server, _ = sockets
    relay = Relay(subscription, ChunkWriter(server, SimpleNamespace(sent=0)))
    relay.resume()
    relay.take(b"dX data")
    assert not relay.on
    with pytest.raises(events.EventDecodeError):
        subscription.next_events(0)


# Through gunicorn's gevent worker, where every stream is relayed once its headers are out.

@pytest.fixture(scope="module")
def api(redis_url: str, scripted_worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("relay-api")
    process, base = start_api(redis_url, tmp, SERVED_MODEL_NAME=SCRIPTED_MODEL)
    yield base
    process.stop()


def relay_count(base: str, event: str) -> float:
    """``inferq_stream_relay_total{event}`` on the API's metrics page."""
    page = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(page)
               for sample in family.samples
               if sample.name == "inferq_stream_relay_total" and sample.labels.get("event") == event)


def post(sock: socket.socket, body: dict) -> None:
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TEST_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                 + payload)


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One chunked HTTP/1.1 response off a keep-alive connection: its head and its decoded body."""
    sock.settimeout(30)
    buffer = bytearray()

    def need(n: int) -> None:
        while len(buffer) < n:
            data = sock.recv(65536)
            assert data, "the connection closed early"
            buffer.extend(data)

    while b"\r\n\r\n" not in buffer:
        need(len(buffer) + 1)
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    buffer[:] = rest
    body = bytearray()
    while True:
        while b"\r\n" not in buffer:
            need(len(buffer) + 1)
        size_line, _, rest = bytes(buffer).partition(b"\r\n")
        size = int(size_line, 16)
        buffer[:] = rest
        need(size + 2)
        assert buffer[size:size + 2] == b"\r\n"
        body += buffer[:size]
        del buffer[:size + 2]
        if size == 0:
            return head, bytes(body)


def test_a_client_that_lags_gets_every_frame_in_order(api: str) -> None:
    host, port = api.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server's writes back up at once
    sock.connect((host, int(port)))
    stalled = relay_count(api, "stalled")
    try:
        # about 5 MiB of frames: more than the server's socket buffer grows to (tcp_wmem: 4 MiB)
        n, tokens = 16, 1500
        post(sock, {"model": SCRIPTED_MODEL, "max_tokens": tokens, "n": n, "stream": True,
                    "messages": [{"role": "user", "content": "[[delay=0.0005]] go"}]})
        time.sleep(3)  # not reading: the relay meets a full socket
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200")
        received = frames(body.decode())
        assert received[-1] == "[DONE]"
        texts: dict[int, list[str]] = {i: [] for i in range(n)}
        for frame in received[:-1]:
            for choice in json.loads(frame).get("choices", []):
                if choice["delta"].get("content"):
                    texts[choice["index"]].append(choice["delta"]["content"])
        for i in range(n):
            assert "".join(texts[i]).split() == [f"tok{k}" for k in range(tokens)]
        # the connection is still good: the response ended with its last chunk and nothing after it
        post(sock, {"model": SCRIPTED_MODEL, "max_tokens": 3, "stream": True,
                    "messages": [{"role": "user", "content": "again"}]})
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and frames(body.decode())[-1] == "[DONE]"
        assert relay_count(api, "stalled") > stalled  # the relay met the full socket, and gave way
    finally:
        sock.close()


def test_a_client_that_hangs_up_mid_stream_cancels_its_job(api: str, redis_client: redis.Redis) -> None:
    host, port = api.removeprefix("http://").split(":")
    marker = f"m{uuid.uuid4().hex}"
    relayed = relay_count(api, "relayed")
    sock = socket.create_connection((host, int(port)))
    post(sock, {"model": SCRIPTED_MODEL, "max_tokens": 2000, "stream": True,
                "messages": [{"role": "user", "content": f"{marker} [[delay=0.01]]"}]})
    sock.settimeout(10)
    received = b""
    while received.count(b"tok") < 20:  # well past the headers: the relay writes these
        received += sock.recv(65536)

    found: list[jobs.JobRecord] = []

    def the_job() -> bool:
        for key in redis_client.scan_iter(keys.job("*")):
            record = jobs.get(redis_client, key.removeprefix(keys.job("")))
            if record is not None and marker in json.dumps(record.request.to_dict()):
                found.append(record)
                return True
        return False

    wait_for(the_job, 10, "the job")
    sock.close()
    hung_up = time.monotonic()
    assert relay_count(api, "relayed") == relayed + 1  # it was this test's stream the reader wrote
    wait_for(lambda: jobs.get(redis_client, found[0].id).status is JobStatus.CANCELLED, 10,
             "the job's cancel")
    assert time.monotonic() - hung_up < 5
    record = jobs.get(redis_client, found[0].id)
    assert record is not None and record.completion_tokens < 2000
