"""How a request's fields and the engine settings reach vLLM (no engine started)."""

from __future__ import annotations

import logging
import os

import pytest

from queueing.jobs import GenerationParams
from workers import engine


def test_every_sampling_field_reaches_vllm() -> None:
    from vllm.sampling_params import RequestOutputKind

    params = GenerationParams(
        kind="chat", model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
        temperature=0.3, top_p=0.8, stop=["END", "\n\n"], seed=1234, presence_penalty=0.5,
        frequency_penalty=-0.25, top_k=40, min_tokens=2, repetition_penalty=1.1, ignore_eos=True)
    sp = engine.to_sampling_params(params, prompt_len=20, max_model_len=2048)
    assert sp.n == 1
    assert sp.max_tokens == 12
    assert sp.temperature == pytest.approx(0.3)
    assert sp.top_p == pytest.approx(0.8)
    assert sp.stop == ["END", "\n\n"]
    assert sp.seed == 1234
    assert sp.presence_penalty == pytest.approx(0.5)
    assert sp.frequency_penalty == pytest.approx(-0.25)
    assert sp.top_k == 40
    assert sp.min_tokens == 2
    assert sp.repetition_penalty == pytest.approx(1.1)
    assert sp.ignore_eos is True
    assert sp.output_kind == RequestOutputKind.DELTA  # the worker publishes deltas as they come


def test_unset_fields_take_openai_defaults_and_max_tokens_fills_the_context() -> None:
    params = GenerationParams(kind="completion", model="m", prompt="hi")
    sp = engine.to_sampling_params(params, prompt_len=48, max_model_len=2048)
    assert sp.max_tokens == 2048 - 48
    assert sp.temperature == 1.0 and sp.top_p == 1.0  # OpenAI's defaults, not vLLM's model defaults
    assert not sp.stop and sp.seed is None


@pytest.mark.parametrize(("requested", "on_cpu", "bf16", "expected"), [
    ("auto", True, False, "float32"),   # bfloat16 emulated on such CPUs is several times slower
    ("auto", True, True, "auto"),
    ("auto", False, False, "auto"),     # GPUs: vLLM's own choice
    ("bfloat16", True, False, "bfloat16"),  # an explicit DTYPE always wins
    ("float16", False, True, "float16"),
])
def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch, requested: str, on_cpu: bool, bf16: bool,
                       expected: str) -> None:
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: bf16)
    assert engine.resolve_dtype(requested, on_cpu) == expected


def test_placeholder_keys_draw_a_startup_warning(app_config: dict, caplog: pytest.LogCaptureFixture) -> None:
    from api import create_app

    with caplog.at_level(logging.WARNING, logger="api"):
        create_app({**app_config, "api_keys": "dev-key-1"})
    warnings = [r.getMessage() for r in caplog.records if "placeholder" in r.getMessage()]
    assert warnings == ["API_KEYS holds 1 placeholder or short key(s): replace them before exposing "
                        "this server"]
    assert "dev-key-1" not in caplog.text  # the key itself is never logged


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
