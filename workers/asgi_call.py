"""Drive an ASGI application for one HTTP request, in-process.

vLLM's OpenAI server is a FastAPI app; the worker calls it directly instead of over
a socket, so every request gets exactly the answer vLLM's server gives (its request
models, validation, error mapping and SSE framing), with no HTTP hop. The response
comes back through two callbacks as it is produced, so streams stay streams.
Cancelling the calling task is the client's hang-up: vLLM then aborts the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

OnStart = Callable[[int, list[tuple[bytes, bytes]]], None]
OnBody = Callable[[bytes], None]


async def call_app(app: Callable[..., Awaitable[None]], method: str, path: str, body: bytes,
                   headers: Sequence[tuple[str, str]], on_start: OnStart, on_body: OnBody) -> None:
    """Send one request to ``app``; ``on_start(status, headers)`` then ``on_body(chunk)`` per chunk.

    Returns when the response is complete. The request body arrives whole, and the
    client never disconnects on its own (``receive`` then waits until cancelled).
    """
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # wait for cancellation: the task's cancel is the hang-up
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            on_start(message["status"], list(message.get("headers", [])))
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                on_body(chunk)

    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": raw_headers, "client": ("127.0.0.1", 0), "server": ("inferq-worker", 0),
    }
    await app(scope, receive, send)
