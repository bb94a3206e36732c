"""The subscribe-mode reply parser, on bytes as Redis sends them, cut anywhere."""

from __future__ import annotations

import socket

import pytest
import redis

from queueing.pubsub_replies import ReplyReader

WIRE = (b"*3\r\n$9\r\nsubscribe\r\n$5\r\njob:1\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$5\r\njob:1\r\n$12\r\nd1 data: x\r\n\r\n"
        b"*3\r\n$7\r\nmessage\r\n$5\r\njob:1\r\n$0\r\n\r\n"
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        b"*3\r\n$11\r\nunsubscribe\r\n$5\r\njob:1\r\n:0\r\n"
        b"*3\r\n$7\r\nmessage\r\n$5\r\njob:2\r\n$-1\r\n")
REPLIES = [[b"subscribe", b"job:1", 1], [b"message", b"job:1", b"d1 data: x\r\n"],
           [b"message", b"job:1", b""], [b"pong", b""], [b"unsubscribe", b"job:1", 0],
           [b"message", b"job:2", None]]


class Chunks:
    """A socket that receives ``chunks``, one per ``recv``, then sees the connection closed."""

    def __init__(self, chunks: list[bytes]):
        self._chunks = iter(chunks)

    def recv(self, size: int) -> bytes:
        return next(self._chunks, b"")


def read_all(chunks: list[bytes]) -> list[list[object]]:
    reader = ReplyReader(Chunks(chunks))  # type: ignore[arg-type]
    replies: list[list[object]] = []
    with pytest.raises(redis.ConnectionError, match="closed"):
        while True:
            replies += reader.read()
    return replies


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_replies_cut_anywhere_are_parsed_once_complete(cut: int) -> None:
    assert read_all([WIRE[:cut], WIRE[cut:]]) == REPLIES


def test_replies_arriving_byte_by_byte() -> None:
    assert read_all([WIRE[i:i + 1] for i in range(len(WIRE))]) == REPLIES


def test_a_large_payload_over_many_reads() -> None:
    payload = bytes(range(256)) * 2000  # binary, with \r\n inside
    wire = b"*3\r\n$7\r\nmessage\r\n$1\r\nj\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    assert read_all([wire[i:i + 70000] for i in range(0, len(wire), 70000)]) == [[b"message", b"j", payload]]


def test_an_error_reply_raises() -> None:
    with pytest.raises(redis.ResponseError, match="only SUBSCRIBE"):
        read_all([b"-ERR only SUBSCRIBE allowed\r\n"])


def test_reads_a_real_socket() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = ReplyReader(ours)
        theirs.sendall(WIRE[:20])
        ours.settimeout(0.1)
        with pytest.raises(TimeoutError):  # no reply complete yet; the bytes stay buffered
            reader.read()
        theirs.sendall(WIRE[20:])
        assert reader.read() == REPLIES
        theirs.close()
        with pytest.raises(redis.ConnectionError):
            reader.read()
