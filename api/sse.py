"""Server-Sent Events framing for OpenAI-style streams."""

from __future__ import annotations

from pydantic import BaseModel

DONE = "data: [DONE]\n\n"


def data(payload: BaseModel, exclude: set[str] | None = None) -> str:
    """One ``data:`` frame: a chunk or an in-stream ``{"error": ...}``.

    ``None`` fields are kept (``finish_reason: null``), as OpenAI sends them.
    """
    return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"

