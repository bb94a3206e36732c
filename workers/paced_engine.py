"""PacedEngine: a TEST DOUBLE that emits tokens at a GPU's pace, for benchmarks of the token path.

A GPU engine advances every running sequence by one token per step and hands the
step's outputs over at once. This double does the same without a model: one step
thread, every ``step`` seconds, emits the next token of each running stream (chat
or completions, in vLLM's wire format, through the job's ``emit`` callback, from
that thread), so 256 streams at a 25 ms step emit about 10,000 tokens/s as a GPU
would. Selected with ``ENGINE=paced``; ``SCRIPTED_TOKEN_DELAY`` is the step
(default 0.025 s). Requests that are not such streams, or that carry a directive,
are answered by :class:`ScriptedEngine` unchanged.

``tokens`` counts what it emitted (exported as ``inferq_paced_engine_tokens_total``),
so a benchmark can set what the stack delivered against what the engine made.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import Counter

from queueing import events
from queueing.jobs import CHAT, COMPLETIONS, JobRequest
from workers.engine import AdmitCallback, EmitCallback
from workers.scripted_engine import DIRECTIVE, Reply, ScriptedEngine, prompt_text

DEFAULT_STEP = 0.025
EMITTED = Counter("inferq_paced_engine_tokens", "Tokens the paced test engine emitted.")


@dataclass
class _Stream:
    """One running stream: its reply's frames and how far it has got."""

    reply: Reply
    emit: EmitCallback
    count: int
    prompt_tokens: int
    sent: int = 0
    cancelled: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


class PacedEngine(ScriptedEngine):
    """Streams advance together, one token per step, on one step thread."""

    def __init__(self, step: float = DEFAULT_STEP, model: str = "scripted-model", max_model_len: int = 2048):
        super().__init__(model=model, max_model_len=max_model_len)
        self.step = step or DEFAULT_STEP
        self.tokens = 0
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._steps, name="paced-engine-steps", daemon=True).start()

    def stream(self, job_id: str, request: JobRequest, emit: EmitCallback | None = None,
               admit: AdmitCallback | None = None, priority: int = 0) -> Iterator[events.TokenEvent]:
        """Start the request; a plain stream advances on the step thread, anything else is scripted."""
        text = prompt_text(request)
        n = request.body.get("n") or 1
        if (emit is None or not request.stream or request.endpoint not in (CHAT, COMPLETIONS) or n != 1
                or DIRECTIVE.search(text)):
            return super().stream(job_id, request, emit, admit, priority)
        body = request.body
        count = body.get("max_completion_tokens") or body.get("max_tokens") or 8
        prompt_tokens = len(text.split())
        refusal = admit(prompt_tokens, count) if admit else None
        if refusal is not None:
            return iter([refusal])
        running = _Stream(Reply(job_id, request, 1), emit, int(count), prompt_tokens)
        with self._streams_lock:
            self._streams[job_id] = running
        return self._end(job_id, running)

    def _end(self, job_id: str, running: _Stream) -> Iterator[events.TokenEvent]:
        try:
            running.ended.wait()
        finally:
            with self._streams_lock:
                self._streams.pop(job_id, None)
        usage = events.Usage(running.prompt_tokens, running.sent)
        yield events.Cancelled(usage=usage) if running.cancelled else events.Done(usage=usage)

    def abort(self, job_id: str) -> bool:
        """Stop a paced stream at the next step (or a scripted request as the scripted engine does)."""
        with self._streams_lock:
            running = self._streams.get(job_id)
        if running is None:
            return super().abort(job_id)
        running.cancelled = True
        return True

    def shutdown(self) -> None:
        """Stop the step thread."""
        self._stopped.set()

    def _steps(self) -> None:
        deadline = time.monotonic()
        while not self._stopped.is_set():
            deadline += self.step
            if (wait := deadline - time.monotonic()) > 0:
                time.sleep(wait)
            else:  # behind (the machine is busy): do not try to catch up in a burst
                deadline = time.monotonic()
            with self._streams_lock:
                running = [s for s in self._streams.values() if not s.ended.is_set()]
            emitted = sum(self._advance(s) for s in running)
            self.tokens += emitted
            EMITTED.inc(emitted)

    @staticmethod
    def _advance(running: _Stream) -> int:
        """Emit the stream's next token (with its opening or closing frames); tokens emitted."""
        if running.cancelled:
            running.ended.set()
            return 0
        reply, i = running.reply, running.sent
        last = i == running.count - 1
        word = f"tok{i}" if i == 0 else f" tok{i}"
        frames = [*reply.opening()] if i == 0 else []
        frames.append(reply.token(0, word, "length" if last else None))
        running.sent += 1
        if last:
            frames += reply.closing([""], events.Usage(running.prompt_tokens, running.sent))
        running.emit(events.Delta("".join(frames).encode(), 1))
        if last:
            running.ended.set()
        return 1
