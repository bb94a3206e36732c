"""Writing a streamed response's chunks straight to the client's socket.

A streamed token normally crosses the stream's greenlet: the pub/sub reader queues
it, the greenlet wakes, and the chunk goes up the WSGI iterator to gunicorn's
``Response.write``. At a GPU's pace that is the API's main cost per token. Once a
stream's headers are out, its relay (:mod:`api.generation.relay`) has the reader
write each chunk here instead, without blocking: what the socket's buffer does not
take is kept, and written by the stream's own greenlet (:meth:`ChunkWriter.flush`).

Only gunicorn's plain HTTP/1.1 chunked responses under gevent qualify (no TLS, no
HTTP/2, not a HEAD): :func:`capture_response` puts gunicorn's response object in the
environ, and :meth:`ChunkWriter.for_environ` returns ``None`` for anything else, where
the chunks take the usual way.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

#: The environ key :func:`capture_response` stores gunicorn's response object under.
RESPONSE = "inferq.gunicorn_response"

_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def frame_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (size line, data, CRLF)."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def write_chunk(sock: Any, data: bytes | str) -> None:
    """gunicorn's ``write_chunk`` (one chunk of a chunked response: every SSE event), with one
    ``send`` where it fits the socket's buffer, as it does unless the client lags.

    gevent's ``sendall`` asks the kernel for the socket's buffer size (``getsockopt``) and
    reads the clock on every call; for a streamed token that was half the cost of its write
    (measured: 5.1-6.4 µs per write against 2.7-3.2 µs).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    chunk = frame_chunk(data)
    sent = sock.send(chunk)  # under gevent: waits (the socket's timeout) while the buffer is full
    if sent < len(chunk):
        sock.sendall(memoryview(chunk)[sent:])


def capture_response(app: _WSGIApp) -> _WSGIApp:
    """Wrap a WSGI app so each request's environ holds gunicorn's response object (the
    owner of ``start_response``), which knows whether the body is chunked and counts the
    bytes sent for the access log."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[RESPONSE] = getattr(start_response, "__self__", None)
        return app(environ, start_response)

    return wsgi


def _cooperative() -> bool:
    """True where the pub/sub reader is a greenlet of the stream's own thread (gevent)."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency of the API
        return False
    return bool(monkey.is_module_patched("threading") and monkey.is_module_patched("socket"))


class ChunkWriter:
    """Writes HTTP/1.1 chunks of one response to its socket, never blocking in :meth:`try_write`."""

    __slots__ = ("_sock", "_response", "_unsent", "_send")

    def __init__(self, sock: Any, response: Any):
        self._sock: Any = sock
        self._response = response
        self._unsent = b""  # framed bytes try_write could not send; flush writes them
        send: Callable[..., int] = sock.send
        gevent_socket = _gevent_socket_class()
        if gevent_socket is not None and isinstance(sock, gevent_socket):
            # gevent's send waits for the socket unless its timeout is 0
            self._send: Callable[[bytes], int] = lambda data: send(data, socket.MSG_DONTWAIT, 0.0)
        else:
            self._send = lambda data: send(data, socket.MSG_DONTWAIT)

    @classmethod
    def for_environ(cls, environ: dict[str, Any]) -> ChunkWriter | None:
        """A writer for the response of this request, once its headers are sent; ``None``
        where chunks must take gunicorn's way (not gunicorn's HTTP/1.1 chunked response
        under gevent, TLS, headers not sent yet)."""
        response = environ.get(RESPONSE)
        sock = environ.get("gunicorn.socket")
        if response is None or sock is None or not _cooperative():
            return None
        from gunicorn.http.wsgi import Response

        if (type(response) is not Response or not response.chunked or not response.headers_sent
                or isinstance(sock, ssl.SSLSocket)):
            return None
        return cls(sock, response)

    def try_write(self, data: bytes) -> bool:
        """Write ``data`` as one chunk as far as the socket takes it now; ``False`` if some
        is left for :meth:`flush` (nothing more may be written before it). ``OSError`` if
        the client is gone."""
        chunk = frame_chunk(data)
        self._response.sent += len(data)
        try:
            sent = self._send(chunk)
        except BlockingIOError:
            sent = 0
        if sent == len(chunk):
            return True
        self._unsent = chunk[sent:]
        return False

    def flush(self) -> None:
        """Write what :meth:`try_write` left, waiting for the socket (``OSError`` if the
        client is gone)."""
        unsent, self._unsent = self._unsent, b""
        if unsent:
            self._sock.sendall(unsent)


def _gevent_socket_class() -> type | None:
    try:
        from gevent.socket import socket as gevent_socket
    except ImportError:  # pragma: no cover
        return None
    return gevent_socket
