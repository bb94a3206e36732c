"""A client's OpenAI request as a job: checked as far as admission needs, and its worst case.

The API has no tokenizer and does not import vLLM. It checks what it must know to
admit a request (the model, whether it streams, the token bounds) and forwards the
body untouched; the worker parses it with vLLM's request models. The worst case is
what the request may cost, worked out without a tokenizer: byte-level BPE and
byte-fallback tokenizers never produce more tokens than the text has UTF-8 bytes,
so the JSON text of everything that reaches the prompt (messages, tools, schemas,
instructions) bounds the prompt from above, plus what a chat template adds. The
worker later replaces this bound with the exact count before the engine runs it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from api.http import errors
from api.protocol import REQUEST_MODELS, ErrorResponse
from queueing.jobs import CHAT, COMPLETIONS, GENERATING, RESPONSES, JobRequest

#: What a chat template adds around the messages: a default system prompt and role markers
#: (per message), and the text that introduces tools. The worker tops the reservation up to
#: the exact count before the engine runs the prompt, so this bound only has to be fair.
TEMPLATE_TOKENS = 64
TOKENS_PER_MESSAGE = 8
TOOL_TEMPLATE_TOKENS = 256
#: Fields of a body that never reach the prompt (everything else is counted).
_NOT_IN_PROMPT = frozenset({"model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens",
                            "max_output_tokens", "temperature", "top_p", "top_k", "seed", "user", "logprobs",
                            "top_logprobs", "presence_penalty", "frequency_penalty", "metadata", "store"})


def parse_job_request(endpoint: str, body: Any, param_prefix: str = "") -> JobRequest | ErrorResponse:
    """The job request for ``body`` sent to ``endpoint``, or a 400 naming what admission cannot read."""
    if not isinstance(body, dict):
        return errors.invalid_request("The body must be a JSON object.", param_prefix.rstrip(".") or None)
    try:
        parsed = REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        err = errors.from_validation_error(exc)
        if param_prefix:
            where = err.error.param
            err.error.param = f"{param_prefix}{where}" if where else param_prefix.rstrip(".")
        return err
    stream = bool(getattr(parsed, "stream", False))
    if body.get("stream", False) is not stream:  # "stream": 1 or "true" streams, as in vLLM: say so plainly
        body = {**body, "stream": stream}
    return JobRequest(endpoint=endpoint, model=parsed.model, body=body)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def prompt_token_bound(request: JobRequest) -> int:
    """At least as many tokens as the request's prompts will have, all prompts together."""
    body = request.body
    prompt_fields = {k: v for k, v in body.items() if k not in _NOT_IN_PROMPT}
    text = json.dumps(prompt_fields, ensure_ascii=False, separators=(",", ":"))
    messages = body.get("messages")
    template = TEMPLATE_TOKENS + TOKENS_PER_MESSAGE * (len(messages) if isinstance(messages, list) else 1)
    return len(text.encode()) + template + (TOOL_TEMPLATE_TOKENS if body.get("tools") else 0)


def prompt_count(request: JobRequest) -> int:
    """How many prompts a completions request runs (a list of prompts runs each)."""
    prompt = request.body.get("prompt")
    if request.endpoint != COMPLETIONS or not isinstance(prompt, list) or not prompt:
        return 1
    return 1 if isinstance(prompt[0], int) else len(prompt)  # a list of token ids is one prompt


def worst_case_tokens(request: JobRequest, max_model_len: int) -> int:
    """Prompt bound plus the most tokens the request may generate (``n`` choices of each prompt);
    nothing for the tokenizer endpoints."""
    if request.endpoint not in GENERATING:
        return 0
    body = request.body
    prompts = prompt_count(request)
    if request.endpoint == RESPONSES:
        most, n = _positive_int(body.get("max_output_tokens")), 1
    else:
        asked = body.get("max_completion_tokens") if request.endpoint == CHAT else None
        most = _positive_int(asked) or _positive_int(body.get("max_tokens"))
        n = _positive_int(body.get("n")) or 1
    completion = min(most or max_model_len, max_model_len)  # vLLM refuses more than the context
    return min(prompt_token_bound(request), max_model_len * prompts) + prompts * n * completion


def length_error(request: JobRequest, max_model_len: int) -> ErrorResponse | None:
    """Refuse at once a completion bound that can never fit the model's context (vLLM's server
    refuses it too, with the same status)."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = _positive_int(request.body.get(name))
        if value is not None and value > max_model_len:
            return errors.error(400, f"{name}={value} cannot be greater than max_model_len={max_model_len}. "
                                "Please request fewer output tokens.", "BadRequestError", None, name)
    return None
