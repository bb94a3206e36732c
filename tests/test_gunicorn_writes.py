"""The API's chunk writer (``api.http.socket_writer.write_chunk``): every byte of every chunk
arrives, framed as HTTP/1.1 chunked encoding, also when the client's buffer is full."""

from __future__ import annotations

import socket
import threading
import time

from api.http.socket_writer import write_chunk


def received(sock: socket.socket, pause: float) -> bytes:
    out = bytearray()
    while chunk := sock.recv(4096):
        out += chunk
        time.sleep(pause)  # a client that lags: the writer's buffer fills
    return bytes(out)


def test_a_chunk_larger_than_the_socket_buffer_arrives_whole() -> None:
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.settimeout(10)  # as under gevent: send waits for room, then sends what fits
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(received(reader, 0.001)))
    thread.start()
    big = bytes(range(256)) * 2048  # 512 KiB: many times the buffer
    write_chunk(writer, big)
    write_chunk(writer, "data: é\n\n")
    writer.close()
    thread.join(30)
    assert result == [b"80000\r\n" + big + b"\r\n" + b"A\r\ndata: \xc3\xa9\n\n\r\n"]


def test_small_chunks_arrive_in_order() -> None:
    writer, reader = socket.socketpair()
    writer.settimeout(10)
    result: list[bytes] = []
    thread = threading.Thread(target=lambda: result.append(received(reader, 0)))
    thread.start()
    events = [f"data: {i}\n\n".encode() for i in range(1000)]
    for event in events:
        write_chunk(writer, event)
    writer.close()
    thread.join(30)
    assert result == [b"".join(b"%X\r\n%s\r\n" % (len(e), e) for e in events)]
