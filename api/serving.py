"""Serving logic for chat and legacy completions.

``serve`` returns a response model, an :class:`ErrorResponse`, or an iterator
of SSE frames; the router only maps those three to HTTP. The two endpoints
differ only in their wire format, which a small format class owns.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Protocol

from flask import has_request_context
from flask import request as http_request
from pydantic import BaseModel

from api import errors, metrics, sse
from api.auth import Principal
from api.gateway import Charge, Gateway, JobStream
from api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    UsageInfo,
)
from config import tracing
from queueing import events
from queueing.jobs import GenerationParams

CANCELLED = errors.error(503, "The request was cancelled before it finished.",
                         "service_unavailable", "cancelled")


def usage_info(usage: events.Usage) -> UsageInfo:
    return UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                     total_tokens=usage.total_tokens)


class WireFormat(Protocol):
    def opening(self) -> list[BaseModel]: ...
    def delta(self, text: str) -> BaseModel: ...
    def finish(self, reason: str) -> BaseModel: ...
    def usage(self, usage: events.Usage) -> BaseModel: ...
    def response(self, text: str, reason: str, usage: events.Usage) -> BaseModel: ...


class ChatFormat:
    """``chat.completion`` and ``chat.completion.chunk`` objects."""

    def __init__(self, job_id: str, model: str):
        self.id, self.model, self.created = f"chatcmpl-{job_id}", model, int(time.time())

    def _chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=choices, usage=usage)

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])]

    def delta(self, text: str) -> BaseModel:
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(content=text))])

    def finish(self, reason: str) -> BaseModel:
        return self._chunk([ChatChunkChoice(delta=DeltaMessage(), finish_reason=reason)])

    def usage(self, usage: events.Usage) -> BaseModel:
        return self._chunk([], usage_info(usage))

    def response(self, text: str, reason: str, usage: events.Usage) -> BaseModel:
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, usage=usage_info(usage),
            choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)],
        )


class CompletionFormat:
    """``text_completion`` objects, buffered and streamed."""

    def __init__(self, job_id: str, model: str):
        self.id, self.model, self.created = f"cmpl-{job_id}", model, int(time.time())

    def _object(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=usage)

    def opening(self) -> list[BaseModel]:
        return []

    def delta(self, text: str) -> BaseModel:
        return self._object([CompletionChoice(text=text)])

    def finish(self, reason: str) -> BaseModel:
        return self._object([CompletionChoice(text="", finish_reason=reason)])

    def usage(self, usage: events.Usage) -> BaseModel:
        return self._object([], usage_info(usage))

    def response(self, text: str, reason: str, usage: events.Usage) -> BaseModel:
        return self._object([CompletionChoice(text=text, finish_reason=reason)], usage_info(usage))


Served = BaseModel | ErrorResponse | Iterator[str]


def serve_chat(gateway: Gateway, request: ChatCompletionRequest, params: GenerationParams,
               principal: Principal, charge: Charge | None = None) -> Served:
    """``POST /v1/chat/completions`` (``params`` is ``request.to_params()``)."""
    return _serve(gateway, request, params, principal, ChatFormat, charge)


def serve_completion(gateway: Gateway, request: CompletionRequest, params: GenerationParams,
                     principal: Principal, charge: Charge | None = None) -> Served:
    """``POST /v1/completions`` (``params`` is ``request.to_params()``)."""
    return _serve(gateway, request, params, principal, CompletionFormat, charge)


def model_not_found(model: str) -> ErrorResponse:
    """OpenAI's answer for a model that does not exist or that the key may not use."""
    return errors.error(404, f"The model '{model}' does not exist or you do not have access to it.",
                        "invalid_request_error", "model_not_found", "model")


def _serve(gateway: Gateway, request: ChatCompletionRequest | CompletionRequest, params: GenerationParams,
           principal: Principal, format_cls: type[ChatFormat] | type[CompletionFormat],
           charge: Charge | None) -> Served:
    if not principal.may_use(request.model):
        return model_not_found(request.model)
    timer = _Timer("chat" if format_cls is ChatFormat else "completions", request.stream, request.model)
    with timer.span.activated():  # the job's task carries this span's trace context
        submitted = gateway.submit(params, principal, charge)
    if isinstance(submitted, ErrorResponse):
        timer.span.end(submitted.error.code)
        return submitted
    fmt = format_cls(submitted.job_id, request.model)
    submitted.client_gone = client_hung_up
    stream = iter(submitted)
    # Wait for the first event before answering, so a request the engine
    # rejects (or a queue deadline) gets its proper HTTP status.
    first = next(stream)
    if isinstance(first, (events.Error, events.Cancelled)):
        submitted.close()
        timer.span.end(first.code if isinstance(first, events.Error) else "cancelled")
        return errors.from_event(first) if isinstance(first, events.Error) else CANCELLED
    timer.first_token()
    if request.stream:
        return _sse(fmt, first, stream, submitted, request.include_usage, timer, errors.current_request_id())
    return _buffered(fmt, first, stream, timer)


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


def _buffered(fmt: WireFormat, first: events.TokenEvent, stream: Iterator[events.TokenEvent],
              timer: _Timer) -> Served:
    parts: list[str] = []
    for event in _chain(first, stream):
        if isinstance(event, events.Delta):
            parts.append(event.text)
        elif isinstance(event, events.Done):
            timer.done()
            return fmt.response("".join(parts), event.finish_reason, event.usage)
        elif isinstance(event, events.Error):
            timer.span.end(event.code)
            return errors.from_event(event)
        else:
            timer.span.end("cancelled")
            return CANCELLED
    return errors.internal_error()


def _sse(fmt: WireFormat, first: events.TokenEvent, stream: Iterator[events.TokenEvent],
         job: JobStream, include_usage: bool, timer: _Timer, request_id: str | None) -> Iterator[str]:
    exclude = None if include_usage else {"usage"}
    try:
        for chunk in fmt.opening():
            yield sse.data(chunk, exclude)
        for event in _chain(first, stream):
            if isinstance(event, events.Delta):
                yield sse.data(fmt.delta(event.text), exclude)
            elif isinstance(event, events.Done):
                yield sse.data(fmt.finish(event.finish_reason), exclude)
                if include_usage:
                    yield sse.data(fmt.usage(event.usage))
                yield sse.DONE
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
