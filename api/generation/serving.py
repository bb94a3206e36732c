"""Serving logic for the endpoints a worker answers (chat, completions, responses, tokenize).

The worker answers through vLLM's own OpenAI serving layer, so the API does not
format completions: ``serve`` returns vLLM's response body (:class:`JSONText`),
an :class:`ErrorResponse`, or an iterator of vLLM's SSE frames; the router only
maps those to HTTP.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from flask import has_request_context
from flask import request as http_request
from pydantic import BaseModel

from api.accounts.auth import Principal
from api.generation.gateway import Charge, Gateway, JobStream
from api.http import errors, metrics, sse
from api.http.socket_writer import ChunkWriter
from api.protocol import ErrorResponse, JSONText
from api.render import model_not_found
from config import tracing
from queueing import events
from queueing.jobs import JobRequest

CANCELLED = errors.error(503, "The request was cancelled before it finished.",
                         "service_unavailable", "cancelled")

#: Metric label of each endpoint.
ENDPOINT_LABELS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                   "/v1/responses": "responses", "/tokenize": "tokenize", "/detokenize": "detokenize"}

Served = BaseModel | ErrorResponse | JSONText | Iterator[bytes]


def serve(gateway: Gateway, request: JobRequest, principal: Principal,
          charge: Charge | None = None) -> Served:
    """Run ``request`` on a worker, which answers through vLLM's own serving layer: its
    response body, its SSE frames relayed as they come, or its error."""
    if not principal.may_use(request.model):
        return model_not_found(request.model)
    timer = _Timer(ENDPOINT_LABELS[request.endpoint], request.stream, request.model)
    with timer.span.activated():  # the job's task carries this span's trace context
        submitted = gateway.submit(request, principal, charge)
    if isinstance(submitted, ErrorResponse):
        timer.span.end(submitted.error.code)
        return submitted
    submitted.client_gone = client_hung_up
    stream = iter(submitted)
    # Wait for the first event before answering, so a request vLLM refuses (or a
    # queue deadline) gets its proper HTTP status.
    first = next(stream)
    if isinstance(first, (events.Error, events.Cancelled)):
        submitted.close()
        timer.span.end(first.code if isinstance(first, events.Error) else "cancelled")
        return errors.from_event(first) if isinstance(first, events.Error) else CANCELLED
    timer.first_token()
    if request.stream:
        environ = http_request.environ if has_request_context() else {}
        return _sse(first, stream, submitted, timer, errors.current_request_id(), environ)
    return _buffered(first, stream, timer)


def client_hung_up() -> bool:
    """True when the client's connection is closed (checked while its job waits for a first event).

    Only gunicorn exposes the socket (``gunicorn.socket``); elsewhere this is always False.
    A readable socket that yields no bytes on a peek has been closed by the client.
    """
    sock = http_request.environ.get("gunicorn.socket") if has_request_context() else None
    if sock is None:
        return False
    try:
        poller = select.poll()  # not select.select: it refuses descriptors past 1023
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a TLS socket cannot peek: no check there
        return False
    except OSError:
        return True


class _Timer:
    """Observes a request's time to first token and, when it succeeds, its latency; and its trace span."""

    def __init__(self, endpoint: str, stream: bool, model: str):
        self.endpoint, self.stream = endpoint, "true" if stream else "false"
        self.start = time.monotonic()
        self.span = tracing.Span(f"inferq.{endpoint}",
                                 attributes={"gen_ai.request.model": model, "inferq.stream": stream})

    def first_token(self) -> None:
        elapsed = time.monotonic() - self.start
        metrics.TTFT.labels(self.endpoint).observe(elapsed)
        self.span.set({"inferq.ttft_s": elapsed})

    def done(self) -> None:
        metrics.REQUEST_DURATION.labels(self.endpoint, self.stream).observe(time.monotonic() - self.start)
        self.span.end()


def _buffered(first: events.TokenEvent, stream: Iterator[events.TokenEvent], timer: _Timer) -> Served:
    """vLLM's body from the done event (the deltas before it are progress: tokens, no text)."""
    for event in _chain(first, stream):
        if isinstance(event, events.Done):
            timer.done()
            return JSONText(event.body or "{}")
        if isinstance(event, events.Error):
            timer.span.end(event.code)
            return errors.from_event(event)
        if isinstance(event, events.Cancelled):
            timer.span.end("cancelled")
            return CANCELLED
    return errors.internal_error()


def _sse(first: events.TokenEvent, stream: Iterator[events.TokenEvent], job: JobStream, timer: _Timer,
         request_id: str | None, environ: dict[str, Any]) -> Iterator[bytes]:
    """vLLM's frames as the worker relayed them; a failure ends the stream with an error object.

    Once the headers are out, the deltas go from the subscriber's reader straight to the
    client's socket where the server allows it (:mod:`api.generation.relay`); this generator
    then yields only what the relay hands back (the end, or frames queued while it was off).
    """
    relaying = False
    try:
        for event in _chain(first, stream):
            if isinstance(event, events.Delta):
                if event.frames:  # a progress delta carries tokens only
                    yield event.frames
                    if not relaying:  # the headers went out with that first write
                        relaying = True
                        writer = ChunkWriter.for_environ(environ)
                        if writer is not None:
                            job.relay_to(writer)
            elif isinstance(event, events.Done):
                timer.done()
            elif isinstance(event, events.Error):
                yield sse.data(errors.naming_request(errors.from_event(event), request_id))
            else:
                yield sse.data(CANCELLED)
    finally:
        job.close()  # a client that disconnected cancels its job
        timer.span.end("incomplete")  # no-op when the stream ended well


def _chain(first: events.TokenEvent, rest: Iterator[events.TokenEvent]) -> Iterator[events.TokenEvent]:
    yield first
    yield from rest
