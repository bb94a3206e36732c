"""ScriptedEngine: a TEST DOUBLE for the vLLM engine.

It answers with known tokens and no model, in the wire format of vLLM's OpenAI
server (chat and completions chunks, Responses API events, tokenize), so the
queue, pub/sub and HTTP plumbing can be tested fast and deterministically under
a real Celery worker and a real Redis. It is selected with ``ENGINE=scripted``;
the real engine, which answers through vLLM's own serving layer, is covered by
the slow end-to-end and differential tests.

The reply is ``tok0 tok1 ...``: one token per word, ``max_tokens`` of them
(default 8) per choice (``n``). The prompt is counted as one token per
whitespace-separated word. Directives in the prompt steer a test:

- ``[[fail]]``: the engine raises an internal error (never shown to clients);
- ``[[fail_after=N]]``: the same error, after N tokens were streamed;
- ``[[too_long]]``: the request is rejected as longer than the context;
- ``[[first_delay=S]]``: wait S seconds before the first token;
- ``[[delay=S]]``: wait S seconds between tokens (default ``SCRIPTED_TOKEN_DELAY``);
- ``[[stop]]``: finish with ``stop`` instead of ``length``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from queueing import events
from queueing.jobs import CHAT, COMPLETIONS, DETOKENIZE, RESPONSES, TOKENIZE, JobRequest
from workers.engine import AdmitCallback, EmitCallback

DIRECTIVE = re.compile(r"\[\[(\w+)(?:=([\d.]+))?\]\]")


class ScriptedEngineFailure(RuntimeError):
    """An internal failure the scripted engine raises on ``[[fail]]``."""


def _text(value: Any) -> str:
    """The words of a message content, prompt or input (strings and text parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text(item) for item in value)
    if isinstance(value, dict):
        return _text(value.get("content") if "content" in value else value.get("text"))
    return ""


def prompt_text(request: JobRequest) -> str:
    body = request.body
    if request.endpoint == CHAT:
        return _text(body.get("messages"))
    if request.endpoint == RESPONSES:
        return " ".join(filter(None, (_text(body.get("instructions")), _text(body.get("input")))))
    return _text(body.get("prompt"))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _frame(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _error(message: str, status: int = 400, param: str | None = None) -> events.Error:
    return events.Error(message=message, status=status, error_type="BadRequestError", param=param)


class Reply:
    """The scripted answer's wire format for one endpoint."""

    def __init__(self, job_id: str, request: JobRequest, n: int):
        self.endpoint, self.model, self.n = request.endpoint, request.model, n
        self.created = int(time.time())
        self.id = {CHAT: f"chatcmpl-{job_id}", COMPLETIONS: f"cmpl-{job_id}"}.get(request.endpoint,
                                                                                   f"resp_{job_id}")
        options = request.body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        kind = "chat.completion.chunk" if self.endpoint == CHAT else "text_completion"
        return _frame({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                       "choices": choices, **extra})

    def opening(self) -> list[str]:
        if self.endpoint == CHAT:
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(self.n)]
        if self.endpoint == RESPONSES:
            return [_frame({"type": "response.created", "sequence_number": 0,
                            "response": self.response("", "in_progress", None)}, "response.created")]
        return []

    def token(self, index: int, text: str, finish: str | None) -> str:
        if self.endpoint == CHAT:
            return self._chunk([{"index": index, "delta": {"content": text}, "logprobs": None,
                                 "finish_reason": finish}])
        if self.endpoint == RESPONSES:
            return _frame({"type": "response.output_text.delta", "delta": text, "item_id": f"msg_{self.id}",
                           "output_index": 0, "content_index": 0, "logprobs": [], "sequence_number": 1},
                          "response.output_text.delta")
        return self._chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": finish}])

    def closing(self, texts: list[str], usage: events.Usage) -> list[str]:
        if self.endpoint == RESPONSES:
            return [_frame({"type": "response.completed", "sequence_number": 2,
                            "response": self.response(texts[0], "completed", usage)}, "response.completed")]
        frames = []
        if self.include_usage:
            frames.append(self._chunk([], usage=_usage(usage)))
        return [*frames, "data: [DONE]\n\n"]

    def response(self, text: str, status: str, usage: events.Usage | None) -> dict[str, Any]:
        """A Responses API ``response`` object."""
        output = [{"id": f"msg_{self.id}", "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}] if text else []
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "usage": None if usage is None else {
                    "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                    "total_tokens": usage.total_tokens}}

    def body(self, texts: list[str], finish: str, usage: events.Usage) -> str:
        if self.endpoint == RESPONSES:
            data = self.response(texts[0], "completed", usage)
        elif self.endpoint == CHAT:
            data = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish} for i, text in enumerate(texts)],
                    "usage": _usage(usage)}
        else:
            data = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                                for i, text in enumerate(texts)], "usage": _usage(usage)}
        return json.dumps(data, separators=(",", ":"))


def _usage(usage: events.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens,
            "completion_tokens": usage.completion_tokens}


class ScriptedEngine:
    """Deterministic engine double."""

    def __init__(self, token_delay: float = 0.0, model: str = "scripted-model", max_model_len: int = 2048):
        self.token_delay = token_delay
        self.model, self.max_model_len = model, max_model_len
        self._created = int(time.time())
        self._aborted: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def models(self) -> list[dict[str, Any]]:
        """The model card, shaped as vLLM's server lists it."""
        return [{"id": self.model, "object": "model", "created": self._created, "owned_by": "inferq",
                 "root": self.model, "parent": None, "max_model_len": self.max_model_len, "permission": []}]

    def stream(self, job_id: str, request: JobRequest, emit: EmitCallback | None = None,
               admit: AdmitCallback | None = None, priority: int = 0) -> Iterator[events.TokenEvent]:
        """Start the request (it can be aborted from now on); the iterator yields the scripted
        answer's frames (or its body) on the caller's thread, then a terminal event."""
        return self._answer(job_id, request, admit, self._register(job_id))

    def _answer(self, job_id: str, request: JobRequest, admit: AdmitCallback | None,
                stop: threading.Event) -> Iterator[events.TokenEvent]:
        try:
            yield from self._checked(job_id, request, admit, stop)
        finally:
            self._unregister(job_id)

    def _checked(self, job_id: str, request: JobRequest, admit: AdmitCallback | None,
                 stop: threading.Event) -> Iterator[events.TokenEvent]:
        text = prompt_text(request)
        words = text.split()
        if request.endpoint in (TOKENIZE, DETOKENIZE):
            yield self._tokenizer(request, words)
            return
        directives = {name: value for name, value in DIRECTIVE.findall(text)}
        if request.endpoint == CHAT and not isinstance(request.body.get("messages"), list):
            yield _error("Field required: messages", param="messages")
            return
        if "too_long" in directives:
            yield _error(f"This model's maximum context length is {self.max_model_len} tokens.")
            return
        body = request.body
        n = _int(body.get("n"), 1) if request.endpoint != RESPONSES else 1
        count = _int(body.get("max_output_tokens") if request.endpoint == RESPONSES
                     else body.get("max_completion_tokens") or body.get("max_tokens"), 8)
        prompt_tokens = len(words)
        refusal = admit(prompt_tokens, n * count) if admit else None
        if refusal is not None:
            yield refusal
            return
        yield from self._generate(job_id, request, directives, n, count, prompt_tokens, stop)

    def _generate(self, job_id: str, request: JobRequest, directives: dict[str, str], n: int, count: int,
                  prompt_tokens: int, stop: threading.Event) -> Iterator[events.TokenEvent]:
        reply = Reply(job_id, request, n)
        streaming = request.stream
        if "first_delay" in directives and stop.wait(float(directives["first_delay"])):
            yield events.Cancelled(usage=events.Usage(prompt_tokens, 0))
            return
        if "fail" in directives:
            raise ScriptedEngineFailure("scripted engine failure at 10.0.0.7:8000 (internal)")
        if streaming:  # as vLLM: the opening frames go out with the first token
            yield events.Delta("".join(reply.opening()).encode(), 0)
        delay = float(directives.get("delay") or self.token_delay)
        fail_after = int(float(directives.get("fail_after") or -1))
        finish = "stop" if "stop" in directives else "length"
        texts = ["" for _ in range(n)]
        for i in range(count):
            if i == fail_after:
                raise ScriptedEngineFailure("scripted engine failure at 10.0.0.7:8000 (internal)")
            if stop.is_set() or (delay and stop.wait(delay)):
                yield events.Cancelled(usage=events.Usage(prompt_tokens, i * n))
                return
            word = f"tok{i}" if i == 0 else f" tok{i}"
            frames = []
            for index in range(n):
                texts[index] += word
                frames.append(reply.token(index, word, finish if i == count - 1 else None))
            if streaming:
                yield events.Delta("".join(frames).encode(), tokens=n)
            else:  # progress, as the real engine reports it while a buffered answer grows
                yield events.Delta(b"", tokens=n)
        usage = events.Usage(prompt_tokens, count * n)
        if streaming:
            yield events.Delta("".join(reply.closing(texts, usage)).encode(), 0)
            yield events.Done(usage=usage)
        else:
            yield events.Done(usage=usage, body=reply.body(texts, finish, usage))

    def _tokenizer(self, request: JobRequest, words: list[str]) -> events.TerminalEvent:
        if request.endpoint == TOKENIZE:
            tokens = list(range(len(words)))
            body: dict[str, Any] = {"count": len(tokens), "max_model_len": self.max_model_len,
                                    "tokens": tokens, "token_strs": None}
        else:
            ids = request.body.get("tokens")
            if not isinstance(ids, list):
                return _error("Field required: tokens", param="tokens")
            body = {"prompt": " ".join(f"tok{t}" for t in ids)}
        return events.Done(usage=events.Usage(0, 0), body=json.dumps(body, separators=(",", ":")))

    def _register(self, job_id: str) -> threading.Event:
        with self._lock:
            stop = self._aborted[job_id] = threading.Event()
            return stop

    def _unregister(self, job_id: str) -> None:
        with self._lock:
            self._aborted.pop(job_id, None)

    def abort(self, job_id: str) -> bool:
        """Stop the request at its next token."""
        with self._lock:
            stop = self._aborted.get(job_id)
        if stop is None:
            return False
        stop.set()
        return True

    def shutdown(self) -> None:
        """Nothing to release."""
