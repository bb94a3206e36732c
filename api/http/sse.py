"""Server-Sent Events framing of the API's own frames (vLLM's frames are relayed as they are)."""

from __future__ import annotations

from pydantic import BaseModel


def data(payload: BaseModel) -> bytes:
    """One ``data:`` frame: the in-stream ``{"error": ...}`` that ends a failed stream.

    ``None`` fields are kept (``param: null``), as OpenAI sends them.
    """
    return b"data: %s\n\n" % payload.model_dump_json().encode()
