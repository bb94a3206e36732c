"""What a request may cost, worked out before it is queued.

The API has no tokenizer, so it bounds the prompt from above: byte-level BPE
and byte-fallback tokenizers never produce more tokens than the text has UTF-8
bytes, plus the special tokens a chat template adds. The worker later replaces
this bound with the exact count (``queueing.metering.adjust_reservation``).
"""

from __future__ import annotations

from api import errors
from api.protocol import ErrorResponse
from queueing.jobs import GenerationParams

#: Upper bound on what a chat template adds: a default system prompt and role markers.
TEMPLATE_TOKENS = 64
TOKENS_PER_MESSAGE = 8


def prompt_token_bound(params: GenerationParams) -> int:
    """At least as many tokens as the prompt will have."""
    if params.kind == "chat":
        messages = params.messages or []
        text_bytes = sum(len(str(m.get("content", "")).encode()) for m in messages)
        return text_bytes + TEMPLATE_TOKENS + TOKENS_PER_MESSAGE * len(messages)
    return len((params.prompt or "").encode()) + 2


def worst_case_tokens(params: GenerationParams, max_model_len: int) -> int:
    """Prompt bound plus the most tokens the request may generate."""
    prompt = prompt_token_bound(params)
    completion = params.max_tokens if params.max_tokens is not None else max(max_model_len - 1, 1)
    return min(prompt, max_model_len) + completion


def length_error(params: GenerationParams, max_model_len: int) -> ErrorResponse | None:
    """Refuse at once what can never fit the model's context (as vLLM's server does)."""
    for name, value in (("max_tokens", params.max_tokens), ("min_tokens", params.min_tokens)):
        if value is not None and value > max_model_len:
            return errors.error(
                400, f"This model's maximum context length is {max_model_len} tokens, and {name} asks "
                f"for {value}.", "invalid_request_error", "context_length_exceeded", name)
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        return errors.error(400, f"min_tokens ({params.min_tokens}) must be at most max_tokens "
                            f"({params.max_tokens}).", "invalid_request_error", "invalid_value", "min_tokens")
    return None
