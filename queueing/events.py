"""Token events: the schema a worker publishes and the API reads.

A job publishes any number of ``delta`` events and then exactly one terminal
event: ``done`` (with the engine's exact usage), ``error`` (sanitized message and
the HTTP status it maps to) or ``cancelled``.

The worker answers through vLLM's own serving layer, so a streamed job's deltas
carry Server-Sent-Events frames exactly as vLLM's server writes them (the API
relays them untouched), and a buffered job's ``done`` carries the response body.

On the wire a delta is not JSON: it is ``d<tokens> `` followed by the frames' bytes,
so neither side escapes or parses the frames (every token crosses this path). The
terminal events, one per job, are JSON objects.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Usage:
    """Token counts as the engine reported them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """SSE frames for the client, ready to send (``data: ...\\n\\n`` as vLLM's server writes
    them), and the ``tokens`` generated since the previous delta (0 where a sender does not count).
    Empty ``frames`` are progress: tokens generated for an answer that is not streamed yet."""

    frames: bytes
    tokens: int = 0
    type: Literal["delta"] = "delta"


@dataclass(frozen=True)
class Done:
    """The job finished; ``usage`` is exact. ``body`` is the JSON response of a buffered
    request (``None`` for a stream, whose frames went out as deltas)."""

    usage: Usage
    body: str | None = None
    type: Literal["done"] = "done"


@dataclass(frozen=True)
class Error:
    """The job failed; ``message`` is safe to show a client."""

    message: str
    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    param: str | None = None
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    type: Literal["error"] = "error"


@dataclass(frozen=True)
class Cancelled:
    """The job was cancelled before it finished."""

    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    type: Literal["cancelled"] = "cancelled"


TokenEvent = Delta | Done | Error | Cancelled
TerminalEvent = Done | Error | Cancelled


class EventDecodeError(ValueError):
    """A message on a job channel is not a token event."""


def is_terminal(event: TokenEvent) -> bool:
    """True for the one event that ends a job's stream."""
    return not isinstance(event, Delta)


_DELTA = b"d"


def encode(event: TokenEvent) -> bytes:
    """Serialize an event for ``PUBLISH``."""
    if isinstance(event, Delta):
        return b"%s%d %s" % (_DELTA, event.tokens, event.frames)
    return json.dumps(asdict(event), separators=(",", ":")).encode()


def delta_parts(raw: bytes) -> tuple[int, bytes] | None:
    """A delta's ``(tokens, frames)`` without building the event, or ``None`` for any
    other event (``EventDecodeError`` for a malformed delta)."""
    if raw[:1] != _DELTA:
        return None
    head, sep, frames = raw.partition(b" ")
    try:
        if sep:
            return int(head[1:]), frames
    except ValueError:
        pass
    raise EventDecodeError(f"bad token event: {raw!r:.200}")


def decode(raw: str | bytes) -> TokenEvent:
    """Parse an event published by :func:`encode`."""
    if isinstance(raw, str):  # from a client that decodes replies
        raw = raw.encode()
    parts = delta_parts(raw)
    if parts is not None:
        return Delta(parts[1], parts[0])
    try:
        data: dict[str, Any] = json.loads(raw)
        kind = data.pop("type")
        usage = Usage(**data.pop("usage"))
        if kind == "done":
            return Done(usage=usage, **data)
        if kind == "error":
            return Error(usage=usage, **data)
        if kind == "cancelled":
            return Cancelled(usage=usage, **data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: JSON not an object
        raise EventDecodeError(f"bad token event: {raw!r:.200}") from exc
    raise EventDecodeError(f"unknown token event type {kind!r}")
