"""The real engine: one ``AsyncLLM`` per worker process, answering through vLLM's own OpenAI app.

The worker builds vLLM's OpenAI server application (``build_app`` + ``init_app_state``,
as ``vllm serve`` does) on its in-process engine, on a private uvloop loop thread,
and calls it in-process for each job (:mod:`workers.asgi_call`). Every request field
vLLM's server accepts therefore works and is answered identically: tools, structured
outputs, logprobs, ``n``, the Responses API, tokenization. Celery task threads call
:meth:`VllmEngine.stream`, which hands the request to that loop and yields token
events from a thread-safe queue, so many tasks feed the one engine at once and vLLM
batches them. This module knows nothing of Celery or Redis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvloop

from config import Settings
from queueing import events
from queueing.jobs import JobRequest
from workers import engine_meter
from workers.asgi_call import call_app
from workers.engine import AdmitCallback, EmitCallback, server_argv
from workers.engine_meter import JobMeter
from workers.vllm_response import ENGINE_FAILURE, StreamFrames, buffered_end, error_event, internal_request

log = logging.getLogger(__name__)

_END = object()
_FAILED = object()  # the engine failed: vLLM's own error frames are not forwarded
_CANCELLED = object()
PRIORITY_HEADER = "X-Vllm-Priority"  # vLLM's own: it overrides a body's "priority"
#: Seconds between progress deltas (no frames, the tokens generated) while vLLM writes nothing,
#: as it does until the end of a buffered answer: the API's idle deadline and a dead worker's
#: settlement go by them. One timer on the engine's loop reports every job's progress, so a job's
#: own thread sleeps until its answer ends instead of waking each interval.
PROGRESS_INTERVAL = 1.0


@dataclass(frozen=True)
class _Start:
    status: int
    sse: bool


class VllmEngine:
    """vLLM's OpenAI app on one ``AsyncLLM``, on a private event loop, driven from worker threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loop = uvloop.new_event_loop()  # vLLM's server runs on uvloop too; it costs less per token
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._running: dict[str, tuple[concurrent.futures.Future[None], _Job]] = {}
        self._lock = threading.Lock()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
        self._app, self._engine = self._run(self._build()).result()
        self._models = self._run(self._get("/v1/models")).result()
        self._loop.call_soon_threadsafe(self._report_progress)

    def _run(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _build(self) -> tuple[Any, Any]:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.platforms import current_platform
        from vllm.tool_parsers import ToolParserManager
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            server_argv(self.settings, current_platform.is_cpu()))
        validate_parsed_serve_args(args)
        if args.tool_parser_plugin:
            ToolParserManager.import_tool_parser(args.tool_parser_plugin)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        log.info("starting vLLM engine: model=%s dtype=%s eager=%s", engine_args.model, engine_args.dtype,
                 engine_args.enforce_eager)
        engine = AsyncLLM.from_engine_args(engine_args)
        engine_meter.meter(engine)
        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        without_http_middleware(app)
        await init_app_state(engine, app.state, args, tasks)
        return app, engine

    async def _get(self, path: str) -> dict[str, Any]:
        body: list[bytes] = []
        await call_app(self._app, "GET", path, b"", (), lambda status, headers: None, body.append)
        data: dict[str, Any] = json.loads(b"".join(body))
        return data

    def models(self) -> list[dict[str, Any]]:
        """The model cards vLLM's server lists at ``/v1/models``."""
        return list(self._models.get("data", []))

    async def _serve(self, job_id: str, request: JobRequest, body: bytes, priority: int, job: _Job,
                     out: queue.SimpleQueue[Any]) -> None:
        meter = job.meter
        engine_meter.current.set(meter)
        failed = False

        def on_start(status: int, headers: list[tuple[bytes, bytes]]) -> None:
            job.streamed = dict(headers).get(b"content-type", b"").startswith(b"text/event-stream")
            out.put(_Start(status, job.streamed))

        def on_body(chunk: bytes) -> None:  # on the loop: a stream's frames go out from here
            nonlocal failed
            if meter.engine_failed and not failed:  # vLLM's in-stream error: the job reports its own
                failed = True
                out.put(_FAILED)
            if failed:
                return
            if not job.streamed:
                out.put(chunk)
            elif job.frames.keep(chunk) and meter.refusal is None:
                job.emit(events.Delta(chunk, job.new_tokens()))

        try:
            await call_app(self._app, "POST", request.endpoint, body,
                           (("x-request-id", job_id), (PRIORITY_HEADER, str(priority))), on_start, on_body)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the job ends with a sanitized error
            if meter.refusal is None:  # a quota refusal raises through vLLM's app on purpose
                log.exception("vLLM's app failed")
            out.put(_FAILED)
        finally:
            job.ended = True  # no progress deltas after its end
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                out.put(_CANCELLED)
            out.put(_END)

    def stream(self, job_id: str, request: JobRequest, emit: EmitCallback, admit: AdmitCallback | None = None,
               priority: int = 0) -> Iterator[events.TokenEvent]:
        """Start one request in vLLM's app (it can be aborted from now on). A stream's frames go
        to ``emit`` from the engine's loop as vLLM writes them; the iterator yields the terminal
        event (after progress deltas while a buffered answer grows)."""
        body, strip_usage = internal_request(request)
        job = _Job(JobMeter(admit=admit), StreamFrames(strip_usage), emit)
        outputs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        future = self._run(self._serve(job_id, request, body, priority, job, outputs))
        # A request cancelled before its task first ran never reaches _serve's own end.
        future.add_done_callback(lambda _: outputs.put(_END))
        with self._lock:
            self._running[job_id] = (future, job)
        return self._relay(job_id, future, job, outputs)

    def _relay(self, job_id: str, future: concurrent.futures.Future[None], job: _Job,
               outputs: queue.SimpleQueue[Any]) -> Iterator[events.TokenEvent]:
        ended = False
        try:
            terminal = _end(outputs, job)
            ended = True
        finally:
            with self._lock:
                self._running.pop(job_id, None)
            if not ended:
                future.cancel()  # the consumer went away: abort inside the engine
        yield terminal

    def abort(self, job_id: str) -> bool:
        """Abort the job's requests in the engine (every sequence of them); vLLM then finishes
        its answer with what was generated, which the job settles to."""
        with self._lock:
            running = self._running.get(job_id)
        if running is None:
            return False
        self._loop.call_soon_threadsafe(self._abort, *running)
        return True

    def _abort(self, future: concurrent.futures.Future[None], job: _Job) -> None:
        meter = job.meter
        meter.cancelled = True
        if meter.request_ids:
            self._loop.create_task(self._engine.abort(list(meter.request_ids)))
        elif meter.prompt_tokens == 0:  # no prompt admitted yet: stop preparing it
            future.cancel()

    def _report_progress(self) -> None:
        """On the loop, every :data:`PROGRESS_INTERVAL`: each running job's tokens that no frame carried."""
        with self._lock:
            jobs = [job for _, job in self._running.values()]
        for job in jobs:  # a stream's meter counts each step; a buffered answer's sees only its end
            job.report_progress(0 if job.streamed else engine_meter.generated_so_far(self._engine, job.meter))
        self._loop.call_later(PROGRESS_INTERVAL, self._report_progress)

    def shutdown(self) -> None:
        """Stop the engine core process and the loop thread."""
        engine, self._engine = self._engine, None
        try:
            engine.shutdown()
            del engine  # let AsyncLLM.__del__ run now, not during interpreter teardown
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


#: vLLM's middleware that concerns a network HTTP server only: CORS answers browsers (an in-process
#: request has no ``Origin``), and the Prometheus instrumentator counts HTTP requests, which in the
#: worker would only count its own in-process calls again (its job metrics count the jobs). Each
#: wraps every chunk a stream sends, on the engine's loop.
HTTP_ONLY_MIDDLEWARE = frozenset({"CORSMiddleware", "PrometheusInstrumentatorMiddleware"})


def without_http_middleware(app: Any) -> None:
    """Drop :data:`HTTP_ONLY_MIDDLEWARE` from vLLM's app (before its first request builds the stack);
    the rest (its exception handlers, scaling and authentication middleware) stays as vLLM's server has it."""
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls.__name__ not in HTTP_ONLY_MIDDLEWARE]
    app.middleware_stack = None


class _Job:
    """One job's state on the engine's loop: its frames, and the tokens they have carried."""

    def __init__(self, meter: JobMeter, frames: StreamFrames, emit: EmitCallback):
        self.meter, self.frames, self.emit = meter, frames, emit
        self.ended = False  # vLLM's app has answered: nothing more is emitted
        self.streamed = False  # vLLM answers with SSE: its frames carry the tokens as they come
        self._sent = 0

    def new_tokens(self, generated: int = 0) -> int:
        """Tokens generated (the meter's count, or ``generated`` if more) that no delta has carried yet
        (on the loop only). Never negative: the engine's count drops a prompt's tokens once that
        prompt ends (a request of several prompts), until the meter gets its final output."""
        total = max(self.meter.completion_tokens, generated)
        tokens, self._sent = max(total - self._sent, 0), max(total, self._sent)
        return tokens

    def report_progress(self, generated: int) -> None:
        """Emit the tokens generated since the last delta as a progress delta (on the loop only);
        ``generated``: the engine's own count so far, if the meter's may lag behind it."""
        if not self.ended and self.meter.refusal is None and (tokens := self.new_tokens(generated)):
            self.emit(events.Delta(b"", tokens))


def _end(outputs: queue.SimpleQueue[Any], job: _Job) -> events.TerminalEvent:
    """Waits for the app's answer to end; the terminal event."""
    meter = job.meter
    start = _Start(0, False)
    buffered: list[bytes] = []
    failed = cancelled = False
    while True:
        item = outputs.get()
        if item is _END:
            break
        if item is _FAILED:
            failed = True
        elif item is _CANCELLED:
            cancelled = True
        elif isinstance(item, _Start):
            start = item
        else:
            buffered.append(item)
    if meter.refusal is not None:
        return meter.refusal
    if failed or meter.engine_failed:
        return dataclasses.replace(ENGINE_FAILURE, usage=meter.usage())
    if cancelled or meter.cancelled or not start.status:
        return events.Cancelled(usage=meter.usage())
    if start.sse:
        return events.Done(usage=job.frames.usage or meter.usage())
    if start.status >= 400:
        return error_event(start.status, b"".join(buffered), meter.usage())
    return buffered_end(start.status, b"".join(buffered), meter.usage())
