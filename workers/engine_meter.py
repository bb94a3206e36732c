"""Per-job metering at the engine's door: admission, exact token counts, engine failures.

vLLM's serving layer calls ``engine_client.generate(prompt, sampling_params, ...)`` once
per prompt of a request (``n`` choices run as one call). :func:`meter` wraps that method
on the worker's one ``AsyncLLM`` so that, for the job whose :class:`JobMeter` is current
(a context variable set by the task that serves the job):

- the quota reservation is topped up to the exact worst case (prompt tokens plus
  ``n`` x ``max_tokens``) before the engine sees the prompt, and the prompt is refused
  if that would cross the key's quota;
- the tokens the engine generates are counted as they come, so a stream that fails or
  is cancelled part-way settles exactly what was generated;
- an engine failure (as opposed to a request vLLM refuses) is noted, so the job ends
  with one sanitized error instead of vLLM's in-stream one;
- the engine request ids are kept, so a cancel aborts them in the engine (every ``n``
  choice), and vLLM's final "abort" output still reports what was generated.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from queueing import events
from workers.engine import AdmitCallback

#: The meter of the job whose request the current task serves (``None`` outside a job).
current: contextvars.ContextVar[JobMeter | None] = contextvars.ContextVar("inferq_job_meter", default=None)


class QuotaRefused(Exception):
    """The exact worst case of a prompt does not fit the key's quota (the job reports the refusal)."""


@dataclass
class JobMeter:
    """What one job's request has consumed in the engine, and how it may be refused."""

    admit: AdmitCallback | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refusal: events.Error | None = None
    engine_failed: bool = False
    cancelled: bool = False
    request_ids: list[str] = field(default_factory=list)  # the engine requests it runs
    _held: int = 0  # most new tokens of the prompts admitted so far
    _seen: dict[tuple[int, int], int] = field(default_factory=dict)  # (call, choice) -> tokens
    _calls: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def usage(self) -> events.Usage:
        """Tokens consumed so far (what a job that ends early settles to)."""
        return events.Usage(self.prompt_tokens, self.completion_tokens)

    async def enter(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Admit one prompt: hold its exact worst case; returns the call's number."""
        async with self._lock:  # calls of one request top up one reservation, in order
            if self.admit is not None:
                loop = asyncio.get_running_loop()  # Redis is synchronous: off the engine's loop
                refusal = await loop.run_in_executor(
                    None, self.admit, self.prompt_tokens + prompt_tokens, self._held + max_new_tokens)
                if refusal is not None:
                    self.refusal = refusal
                    raise QuotaRefused(refusal.message)
            self.prompt_tokens += prompt_tokens
            self._held += max_new_tokens
            self._calls += 1
            return self._calls

    def count(self, call: int, output: Any, delta: bool) -> None:
        """Add the tokens of one engine output (``delta``: its token ids are new ones only)."""
        for choice in output.outputs:
            key = (call, choice.index)
            before = self._seen.get(key, 0)
            now = before + len(choice.token_ids) if delta else len(choice.token_ids)
            self._seen[key] = now
            self.completion_tokens += now - before


def meter(engine: Any) -> None:
    """Wrap ``engine.generate`` (an ``AsyncLLM``) so the current job's :class:`JobMeter` sees each call."""
    from vllm.renderers.inputs.preprocess import extract_prompt_len
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    inner: Callable[..., AsyncGenerator[Any, None]] = engine.generate
    model_config = engine.model_config

    @functools.wraps(inner)
    async def generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        job = current.get()
        if job is None:
            async for output in inner(prompt, sampling_params, request_id, *args, **kwargs):
                yield output
            return
        n = getattr(sampling_params, "n", 1) or 1
        max_tokens = getattr(sampling_params, "max_tokens", 0) or 0
        call = await job.enter(extract_prompt_len(model_config, prompt), n * max_tokens)
        if job.cancelled:  # cancelled while its prompt was being prepared
            raise asyncio.CancelledError
        job.request_ids.append(request_id)
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        outputs = inner(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            async for output in outputs:
                job.count(call, output, delta)
                yield output
        except (EngineDeadError, EngineGenerateError):
            job.engine_failed = True
            raise
        finally:
            await outputs.aclose()  # a consumer that stopped early aborts the request in the engine

    engine.generate = generate


def generated_so_far(engine: Any, meter: JobMeter) -> int:
    """Tokens the engine has generated for ``meter``'s requests so far, read from vLLM's output
    processor. A buffered answer's outputs reach the meter only at its end (vLLM asks the engine for
    the final output only), so this is how its progress is seen; 0 where vLLM keeps no such state."""
    try:
        processor = engine.output_processor
        by_external = processor.external_req_ids
        internal_ids = [i for external in meter.request_ids for i in by_external.get(external, ())]
        states = [processor.request_states.get(internal) for internal in internal_ids]
        return sum(state.detokenizer.num_output_tokens() for state in states if state is not None)
    except AttributeError:  # another vLLM's internals: only the meter's own count then
        return 0
