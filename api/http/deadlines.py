"""Deadlines for slow clients under gunicorn's gevent workers (issue 15, M2).

A request's head (request line and headers) must arrive within HEADER_READ_TIMEOUT: of the
connection's start for its first request; on a kept-alive connection, which may wait up to
the keep-alive for the next request, of that request's first byte. Its body must arrive
within BODY_READ_TIMEOUT plus one second per BODY_MIN_RATE bytes read: a slow uploader that
keeps the pace is never cut, a client trickling a byte a second is answered 408 and its
connection closed. A body the app left unread (a 401 comes before the body is read) is
drained under the same deadline, else the connection closes. Before, a trickled body
held its connection (and, chunked, up to MAX_REQUEST_BYTES of memory before auth) for as long
as the client liked, and a trickled head for the whole keep-alive.

gunicorn has no setting for either, and reads the head in its own worker loop:
:func:`install` (``post_worker_init``) gives that loop a parser with the head deadline and
wraps the worker's WSGI app so that every read of ``wsgi.input`` runs under a gevent timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.select
from gunicorn.http.parser import RequestParser
from werkzeug.exceptions import RequestTimeout

from config import Settings

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
LAST_CHANCE = 0.01  # seconds a read past its deadline still gets: what has arrived is not refused
DRAIN_CHUNK = 64 * 1024  # bytes read at a time from a body the app left unread


@dataclass(frozen=True)
class Deadlines:
    head: float  # seconds for a request's head
    body: float  # seconds for a body, before BODY_MIN_RATE extends them
    body_min_rate: int  # bytes a second that earn a body one more second
    keepalive: float  # seconds a kept-alive connection waits for its next request

    @classmethod
    def from_settings(cls, settings: Settings, keepalive: float) -> Deadlines:
        return cls(settings.header_read_timeout, settings.body_read_timeout, settings.body_min_rate,
                   keepalive)


class BodyTimeout(RequestTimeout):
    """408: the body did not arrive in time (OpenAI-shaped by the app's HTTP error handler).

    Raised inside gunicorn's body reader, which marks the body failed: the connection closes
    after the response instead of waiting for the rest of the body.
    """


class DeadlineInput:
    """``wsgi.input`` whose reads end by the body's deadline, which each byte read pushes back
    by ``1 / body_min_rate`` seconds."""

    def __init__(self, stream: Any, deadlines: Deadlines) -> None:
        self._stream = stream
        self._deadlines = deadlines
        self._started = time.monotonic()
        self._received = 0
        self._timeout = BodyTimeout(
            f"The request body did not arrive in time: a body gets {deadlines.body:g} seconds plus one "
            f"for every {deadlines.body_min_rate} bytes (BODY_READ_TIMEOUT, BODY_MIN_RATE).")

    def read(self, size: int | None = -1) -> bytes:
        return self._within_deadline(self._stream.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._within_deadline(self._stream.readline, size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _within_deadline(self, read: Callable[[int | None], bytes], size: int | None) -> bytes:
        d = self._deadlines
        deadline = self._started + d.body + self._received / d.body_min_rate
        with gevent.Timeout(max(deadline - time.monotonic(), LAST_CHANCE), self._timeout):
            data = read(size)
        self._received += len(data)
        return data


class BodyDeadline:
    """WSGI middleware: the request's ``wsgi.input`` as a :class:`DeadlineInput`."""

    def __init__(self, app: WSGIApp, deadlines: Deadlines) -> None:
        self.app = app
        self.deadlines = deadlines

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.input"] = DeadlineInput(environ["wsgi.input"], self.deadlines)
        return self.app(environ, start_response)


class HeadDeadlineParser(RequestParser):
    """gunicorn's HTTP/1 request parser, with a deadline for each request's head, a bounded
    drain of the body the app left unread, and the keep-alive wait for the next request apart
    from both. Ending the iteration closes the connection (gunicorn's worker loop)."""

    def __init__(self, cfg: Any, source: Any, source_addr: Any, deadlines: Deadlines) -> None:
        super().__init__(cfg, source, source_addr)
        self.deadlines = deadlines

    def __next__(self) -> Any:
        if self.mesg is not None and not self.mesg.should_close():
            self._await_next_request()
        with gevent.Timeout(self.deadlines.head) as head:
            try:
                return super().__next__()
            except gevent.Timeout as exc:
                if exc is not head:
                    raise
                raise StopIteration from None

    def _await_next_request(self) -> None:
        """Drain the body the app left unread, then wait for the next request's first byte."""
        d = self.deadlines
        body = getattr(self.mesg, "body", None)
        if body is not None:
            if getattr(body, "failed", False):  # a read raised: where the next request starts is unknown
                raise StopIteration
            reader = DeadlineInput(body, d)  # gunicorn's own drain deadline applies per 1 KiB read
            try:
                while reader.read(DRAIN_CHUNK):
                    pass
            except BodyTimeout:
                raise StopIteration from None
        sock = self.unreader.sock
        pending = getattr(sock, "pending", None)  # TLS: bytes decrypted already are not "readable"
        if self.unreader.buf.getvalue() or (pending is not None and pending()):
            return
        readable, _, _ = gevent.select.select([sock], [], [], d.keepalive)
        if not readable:
            raise StopIteration


def install(worker: Any, settings: Settings) -> None:
    """Put the deadlines into a gunicorn gevent ``worker`` (from its ``post_worker_init``)."""
    from gunicorn import http
    from gunicorn.workers.ggevent import GeventWorker

    if not isinstance(worker, GeventWorker):
        return
    deadlines = Deadlines.from_settings(settings, worker.cfg.keepalive)
    parser_for = http.get_parser

    def get_parser(cfg: Any, source: Any, source_addr: Any, http2_connection: bool = False) -> Any:
        if http2_connection or getattr(cfg, "protocol", "http") != "http":
            return parser_for(cfg, source, source_addr, http2_connection)
        return HeadDeadlineParser(cfg, source, source_addr, deadlines)

    http.get_parser = get_parser  # looked up by gunicorn's worker loop for each connection
    worker.wsgi = BodyDeadline(worker.wsgi, deadlines)
