"""The in-process vLLM engine: job parameters in, token events out.

One :class:`VllmEngine` per worker process hosts one ``AsyncLLM`` on its own
asyncio loop thread. Celery task threads call :meth:`VllmEngine.stream`, which
hands the request to that loop and yields token events from a thread-safe
queue, so many tasks feed the one engine at once and vLLM batches them. This
module knows nothing of Celery or Redis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from config import Settings
from queueing import events
from queueing.jobs import GenerationParams

if TYPE_CHECKING:
    from vllm import SamplingParams

log = logging.getLogger(__name__)

_END = object()


#: Called with (prompt tokens, most new tokens) once the prompt is tokenized and
#: before the engine sees the request; an error event returned refuses the request.
AdmitCallback = Callable[[int, int], "events.Error | None"]


class Engine(Protocol):
    """What a worker needs from an engine (the real one or a test double)."""

    def stream(self, request_id: str, params: GenerationParams, admit: AdmitCallback | None = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        """Yield deltas, then exactly one terminal event.

        ``priority``: lower runs first when the engine is full (0 interactive, 1 batch).
        """
        ...

    def abort(self, request_id: str) -> bool:
        """Stop generating for ``request_id``; False if it is not running here."""
        ...

    def shutdown(self) -> None:
        """Release the engine."""
        ...


class PromptError(ValueError):
    """The request cannot run on this model (e.g. longer than its context)."""

    def __init__(self, message: str, code: str = "context_length_exceeded", param: str | None = "messages"):
        super().__init__(message)
        self.code = code
        self.param = param

    def to_event(self) -> events.Error:
        return events.Error(
            message=str(self), status=400, error_type="invalid_request_error",
            code=self.code, param=self.param,
        )


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, on_cpu: bool) -> str:
    """``auto`` means float32 on CPUs without bf16 (about 3.6x faster there)."""
    if requested != "auto":
        return requested
    if on_cpu and not cpu_supports_bf16():
        return "float32"
    return "auto"


def engine_args(s: Settings, on_cpu: bool) -> dict[str, Any]:
    """The worker's vLLM engine arguments (``loadtest.batch_bench`` gives its offline baseline the same)."""
    return {
        "model": s.model_name,
        "served_model_name": [s.served_model_name],
        "tensor_parallel_size": s.tp_size,
        "dtype": resolve_dtype(s.dtype, on_cpu),
        "max_model_len": s.max_model_len,
        "max_num_seqs": s.max_num_seqs,
        "gpu_memory_utilization": s.gpu_memory_utilization,
        "enforce_eager": on_cpu if s.enforce_eager is None else s.enforce_eager,
        "scheduling_policy": "priority",  # interactive requests ahead of batch work
        "disable_log_stats": False,
    }


def build_prompt_ids(tokenizer: Any, params: GenerationParams, max_model_len: int) -> list[int]:
    """Token ids of the prompt: the chat template applied, or the raw completion prompt."""
    if params.kind == "chat":
        text = tokenizer.apply_chat_template(
            params.messages, add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        param = "messages"
    else:
        ids = tokenizer.encode(params.prompt or "", add_special_tokens=True)
        param = "prompt"
    requested = params.max_tokens or 0
    if len(ids) + max(requested, 1) > max_model_len:
        raise PromptError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {len(ids) + requested} tokens ({len(ids)} in the prompt, {requested} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param=param,
        )
    return list(ids)


def to_sampling_params(params: GenerationParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    """vLLM sampling parameters for a job; deltas only, one sequence."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=params.max_tokens or (max_model_len - prompt_len),
        temperature=1.0 if params.temperature is None else params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        stop=params.stop or None,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        top_k=params.top_k if params.top_k is not None else 0,
        min_tokens=params.min_tokens,
        repetition_penalty=1.0 if params.repetition_penalty is None else params.repetition_penalty,
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
    )


class VllmEngine:
    """One ``AsyncLLM`` on a private event loop, driven from worker threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._running: dict[str, concurrent.futures.Future[None]] = {}
        self._lock = threading.Lock()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
        self._engine = self._run(self._build()).result()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_name)
        self.max_model_len = settings.max_model_len

    def _run(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_args(self.settings, current_platform.is_cpu()))
        log.info("starting vLLM engine: model=%s dtype=%s eager=%s",
                 args.model, args.dtype, args.enforce_eager)
        return AsyncLLM.from_engine_args(args)

    async def _pump(self, request_id: str, prompt_ids: list[int], sp: SamplingParams, priority: int,
                    out: queue.SimpleQueue[Any]) -> None:
        try:
            async for item in self._engine.generate({"prompt_token_ids": prompt_ids}, sp, request_id,
                                                    priority=priority):
                out.put(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the task thread
            out.put(exc)
        finally:
            out.put(_END)

    def stream(self, request_id: str, params: GenerationParams, admit: AdmitCallback | None = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        """Run one request; yield deltas (coalesced when the consumer lags), then a terminal event."""
        try:
            prompt_ids = build_prompt_ids(self.tokenizer, params, self.max_model_len)
        except PromptError as exc:
            yield exc.to_event()
            return
        sp = to_sampling_params(params, len(prompt_ids), self.max_model_len)
        refusal = admit(len(prompt_ids), sp.max_tokens or 0) if admit else None
        if refusal is not None:
            yield refusal
            return
        outputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        future = self._run(self._pump(request_id, prompt_ids, sp, priority, outputs))
        with self._lock:
            self._running[request_id] = future
        completion_tokens = 0
        unsent = 0  # tokens of steps that produced no text yet (counted in the next delta)
        finish_reason = None
        ended = False
        try:
            while not ended:
                batch = [outputs.get()]
                while not outputs.empty():  # several engine steps ready: publish them as one delta
                    batch.append(outputs.get_nowait())
                text = []
                tokens = 0
                for item in batch:
                    if item is _END:
                        ended = True
                        break
                    if isinstance(item, ValueError):  # vLLM's input validation
                        yield PromptError(str(item), code="invalid_request", param=None).to_event()
                        return
                    if isinstance(item, Exception):
                        raise item
                    completion = item.outputs[0]
                    text.append(completion.text)
                    tokens += len(completion.token_ids)
                    finish_reason = completion.finish_reason or finish_reason
                completion_tokens += tokens
                unsent += tokens
                if any(text):
                    yield events.Delta("".join(text), unsent)
                    unsent = 0
        finally:
            with self._lock:
                self._running.pop(request_id, None)
            if not ended:
                future.cancel()  # the consumer went away: abort inside the engine
        usage = events.Usage(len(prompt_ids), completion_tokens)
        if finish_reason in ("stop", "length"):
            yield events.Done(finish_reason=finish_reason, usage=usage)
        else:
            yield events.Cancelled(usage=usage)

    def abort(self, request_id: str) -> bool:
        """Cancel the request's coroutine; vLLM aborts it in the engine core."""
        with self._lock:
            future = self._running.get(request_id)
        if future is None:
            return False
        future.cancel()
        return True

    def shutdown(self) -> None:
        """Stop the engine core process and the loop thread."""
        engine, self._engine = self._engine, None
        try:
            engine.shutdown()
            del engine  # let AsyncLLM.__del__ run now, not during interpreter teardown
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
