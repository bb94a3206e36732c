"""Helpers to read SSE bodies in tests."""

from __future__ import annotations

import json
from typing import Any


def frames(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(block[len("data: "):])
    return out


def chunks(body: str) -> list[dict[str, Any]]:
    """Parsed JSON payloads, without the final ``[DONE]``."""
    return [json.loads(f) for f in frames(body) if f != "[DONE]"]


def content(body: str) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks(body) if c.get("choices")
    )
