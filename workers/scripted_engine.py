"""ScriptedEngine: a TEST DOUBLE for the vLLM engine.

It emits known tokens with no model, so the queue, pub/sub and HTTP plumbing
can be tested fast and deterministically under a real Celery worker and a real
Redis. It is selected with ``ENGINE=scripted``; the real engine is covered by
the slow end-to-end tests.

The reply is ``tok0 tok1 ...``: one token per word, ``max_tokens`` of them
(default 8). The prompt is counted as one token per whitespace-separated word.
Directives in the prompt (last message or completion prompt) steer a test:

- ``[[fail]]``: the engine raises an internal error (never shown to clients);
- ``[[fail_after=N]]``: the same error, after N tokens were streamed;
- ``[[too_long]]``: the request is rejected as longer than the context;
- ``[[first_delay=S]]``: wait S seconds before the first token;
- ``[[delay=S]]``: wait S seconds between tokens (default ``SCRIPTED_TOKEN_DELAY``);
- ``[[stop]]``: finish with ``stop`` instead of ``length``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

from queueing import events
from queueing.jobs import GenerationParams
from workers.engine import AdmitCallback, PromptError

_DIRECTIVE = re.compile(r"\[\[(\w+)(?:=([\d.]+))?\]\]")


class ScriptedEngineFailure(RuntimeError):
    """An internal failure the scripted engine raises on ``[[fail]]``."""


def _prompt_text(params: GenerationParams) -> str:
    if params.kind == "chat":
        return " ".join(str(m.get("content", "")) for m in params.messages or [])
    return params.prompt or ""


class ScriptedEngine:
    """Deterministic engine double."""

    def __init__(self, token_delay: float = 0.0):
        self.token_delay = token_delay
        self._aborted: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def stream(self, request_id: str, params: GenerationParams, admit: AdmitCallback | None = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        """Yield ``tok0 tok1 ...`` as deltas, then a terminal event."""
        text = _prompt_text(params)
        directives = {name: value for name, value in _DIRECTIVE.findall(text)}
        prompt_tokens = len(text.split())
        if "too_long" in directives:
            yield PromptError("This model's maximum context length is 16 tokens.").to_event()
            return
        count = params.max_tokens or 8
        refusal = admit(prompt_tokens, count) if admit else None
        if refusal is not None:
            yield refusal
            return
        stop = self._register(request_id)
        try:
            if "first_delay" in directives and stop.wait(float(directives["first_delay"])):
                yield events.Cancelled(usage=events.Usage(prompt_tokens, 0))
                return
            if "fail" in directives:
                raise ScriptedEngineFailure("scripted engine failure at 10.0.0.7:8000 (internal)")
            delay = float(directives.get("delay") or self.token_delay)
            fail_after = int(float(directives.get("fail_after") or -1))
            for i in range(count):
                if i == fail_after:
                    raise ScriptedEngineFailure("scripted engine failure at 10.0.0.7:8000 (internal)")
                if stop.is_set() or (delay and stop.wait(delay)):
                    yield events.Cancelled(usage=events.Usage(prompt_tokens, i))
                    return
                yield events.Delta(f"tok{i}" if i == 0 else f" tok{i}", tokens=1)
            reason: events.FinishReason = "stop" if "stop" in directives else "length"
            yield events.Done(finish_reason=reason, usage=events.Usage(prompt_tokens, count))
        finally:
            self._unregister(request_id)

    def _register(self, request_id: str) -> threading.Event:
        with self._lock:
            stop = self._aborted[request_id] = threading.Event()
            return stop

    def _unregister(self, request_id: str) -> None:
        with self._lock:
            self._aborted.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Stop the request at its next token."""
        with self._lock:
            stop = self._aborted.get(request_id)
        if stop is None:
            return False
        stop.set()
        return True

    def shutdown(self) -> None:
        """Nothing to release."""
