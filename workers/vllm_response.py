"""Turns what vLLM's OpenAI app answered for one job into token events.

Streams: each SSE frame goes out as vLLM wrote it (frames that are ready together go
out as one delta). The worker always asks a chat or completions stream for usage;
when the client did not, the usage frame is read and dropped, so the client gets
exactly what vLLM's server would have sent it. Buffered answers: the body as it is.
Errors: vLLM's status and message in OpenAI's shape; a 5xx message stays in the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from queueing import events
from queueing.jobs import CHAT, COMPLETIONS, JobRequest

log = logging.getLogger(__name__)

_USAGE_FRAME = b'"choices":[],"usage":'
_RESPONSE_END = (b"event: response.completed", b"event: response.incomplete", b"event: response.failed")

ENGINE_FAILURE = events.Error(
    message="The engine failed while processing this request.",
    status=500,
    error_type="server_error",
    code="engine_error",
)


def internal_request(request: JobRequest) -> tuple[bytes, bool]:
    """The body the worker sends vLLM, and whether the client's stream drops the usage frame.

    A chat or completions stream always asks for usage (settled exactly from it); a
    ``stream_options`` that is not an object is left for vLLM to refuse.
    """
    body = request.body
    strip_usage = False
    if request.stream and request.endpoint in (CHAT, COMPLETIONS):
        options = body.get("stream_options")
        if options is None or (isinstance(options, dict) and options.get("include_usage") is not True):
            options = dict(options or {})
            # without include_usage vLLM sends no usage at all, continuous or not
            options.update(include_usage=True, continuous_usage_stats=False)
            body = {**body, "stream_options": options}
            strip_usage = True
    return json.dumps(body, separators=(",", ":")).encode(), strip_usage


def usage_of(data: dict[str, Any]) -> events.Usage | None:
    """The usage in a response object (chat and completions, or the Responses API's names)."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:
        return events.Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))
    return events.Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


class StreamFrames:
    """Filters one stream's frames and finds its usage."""

    def __init__(self, strip_usage: bool):
        self.strip_usage = strip_usage
        self.usage: events.Usage | None = None

    def keep(self, frame: bytes) -> bool:
        """Whether ``frame`` goes to the client (reads the usage frame on the way)."""
        if _USAGE_FRAME in frame and frame.startswith(b"data: "):
            self.usage = usage_of(json.loads(frame[6:]))
            return not self.strip_usage
        if frame.startswith(_RESPONSE_END):
            data = frame.split(b"\ndata: ", 1)[1]
            response = json.loads(data).get("response") or {}
            self.usage = usage_of(response)
        return True


def buffered_end(status: int, body: bytes, fallback: events.Usage) -> events.TerminalEvent:
    """The terminal event of a buffered answer: its body on success, else the error."""
    if status < 400:
        try:
            usage = usage_of(json.loads(body)) or fallback
        except ValueError:
            usage = fallback
        return events.Done(usage=usage, body=body.decode())
    return error_event(status, body, fallback)


def error_event(status: int, body: bytes, usage: events.Usage) -> events.Error:
    """vLLM's error answer as an error event (a server error's details only in the log)."""
    try:
        data = json.loads(body)
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):  # FastAPI's own answers: {"detail": ...}
            error = {"message": str(data.get("detail", "")) if isinstance(data, dict) else "",
                     "type": "invalid_request_error"}
    except ValueError:
        error = {"message": body[:200].decode(errors="replace"), "type": "server_error"}
    if status >= 500:
        log.error("vLLM answered %d: %s", status, error.get("message"))
        return dataclasses.replace(ENGINE_FAILURE, status=status, usage=usage)
    param = error.get("param")
    return events.Error(message=str(error.get("message") or "Invalid request."), status=status,
                        error_type=str(error.get("type") or "invalid_request_error"),
                        param=str(param) if param is not None else None, usage=usage)
