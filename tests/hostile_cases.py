"""Handwritten hostile request bodies for ``test_fuzz.py``: the cases, as data.

Each case: (id, path, raw body, expected status, expected OpenAI error code or None).
``BAD_BODIES`` are refused by the API itself (admission); ``FORWARDED`` are bodies the API
forwards for vLLM's serving layer to judge, checked against vLLM's own server in the slow
differential test (the scripted engine does not validate like vLLM).
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import SCRIPTED_MODEL


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": SCRIPTED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **fields}


def raw_chat(fragment: str) -> bytes:
    """A chat body whose message content is the raw JSON ``fragment`` (escapes kept as sent)."""
    return (f'{{"model": "{SCRIPTED_MODEL}", "max_tokens": 2, '
            f'"messages": [{{"role": "user", "content": {fragment}}}]}}').encode()


def encoded(body: Any) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as its \ud800 escape


CHAT = "/v1/chat/completions"
BAD_BODIES: list[tuple[str, str, bytes, int, str | None]] = [
    # invalid JSON and bodies that are not an object
    ("truncated", CHAT, b'{"model": ', 400, None),
    ("empty", CHAT, b"", 400, None),
    ("trailing garbage", CHAT, b'{"model": "m"} x', 400, None),
    ("array", CHAT, b"[]", 400, None),
    ("string", CHAT, b'"hi"', 400, None),
    ("null", CHAT, b"null", 400, None),
    ("invalid UTF-8", CHAT, b'{"model": "\xff\xfe", "messages": []}', 400, None),
    ("nested 50000 deep", CHAT, b"[" * 50_000, 400, None),
    ("nested deep in a field", CHAT, b'{"model": "m", "messages": ' + b"[" * 20_000, 400, None),
    ("1e400", CHAT, raw_chat('"x"').replace(b'"max_tokens": 2', b'"max_tokens": 1e400'), 400, None),
    # wrong types
    ("model a number", CHAT, encoded(chat(model=1)), 400, None),
    ("model null", CHAT, encoded(chat(model=None)), 400, None),
    ("messages a string", CHAT, encoded(chat(messages="hi")), 400, None),
    ("message a number", CHAT, encoded(chat(messages=[1])), 400, None),
    ("max_tokens a word", CHAT, encoded(chat(max_tokens="ten")), 400, None),
    ("max_tokens a fraction", CHAT, encoded(chat(max_tokens=1.5)), 400, None),
    ("temperature a word", CHAT, encoded(chat(temperature="hot")), 400, None),
    ("stream a list", CHAT, encoded(chat(stream=[])), 400, None),
    ("stream_options a word", CHAT, encoded(chat(stream_options="yes")), 400, None),
    ("prompt a number", "/v1/completions", encoded({"model": SCRIPTED_MODEL, "prompt": 1}), 400, None),
    ("job endpoint", "/v1/jobs", encoded({"endpoint": "/v1/embeddings", "body": chat()}), 400, None),
    ("job body a list", "/v1/jobs", encoded({"endpoint": CHAT, "body": []}), 400, None),
    ("streamed job", "/v1/jobs", encoded({"endpoint": CHAT, "body": chat(stream=True)}), 400, None),
    ("batch window", "/v1/batches", encoded({"input_file_id": "f", "endpoint": CHAT,
                                             "completion_window": "1h"}), 400, None),
    # huge and negative numbers
    # models and messages
    ("unknown model", CHAT, encoded(chat(model="no-such-model")), 404, "model_not_found"),
    ("unknown model, huge max_tokens", CHAT, encoded(chat(model="no-such-model", max_tokens=10**30)), 404,
     "model_not_found"),
    ("unknown completions model", "/v1/completions", encoded({"model": "gpt-4", "prompt": "a"}), 404,
     "model_not_found"),
    ("unknown job model", "/v1/jobs", encoded({"endpoint": CHAT, "body": chat(model="gpt-4")}), 404,
     "model_not_found"),
    ("empty model", CHAT, encoded(chat(model="")), 400, None),
    ("empty messages", CHAT, encoded(chat(messages=[])), 400, None),
    ("duplicate keys (the last wins)", CHAT,
     f'{{"model": "{SCRIPTED_MODEL}", "model": "no-such-model", "messages": [{{"role": "user", '
     f'"content": "x"}}]}}'.encode(), 404, "model_not_found"),
    # prompts over the context length (the scripted engine's [[too_long]])
    ("too long", CHAT, encoded(chat(messages=[{"role": "user", "content": "[[too_long]]"}])), 400,
     None),
    ("too long, streamed", CHAT, encoded(chat(messages=[{"role": "user", "content": "[[too_long]]"}],
                                              stream=True)), 400, None),
    ("too long completion", "/v1/completions", encoded({"model": SCRIPTED_MODEL, "prompt": "[[too_long]]"}),
     400, None),
    # lone surrogates: \ud800 escapes decode to strings that are not text
    ("lone high surrogate", CHAT, raw_chat(r'"\ud800"'), 400, None),
    ("lone low surrogate", CHAT, raw_chat(r'"a\udfffb"'), 400, None),
    ("reversed pair", CHAT, raw_chat(r'"\udc00\ud800"'), 400, None),
    ("surrogate in a content part", CHAT, raw_chat(r'[{"type": "text", "text": "\ud800"}]'), 400, None),
    ("surrogate model", CHAT, encoded(chat(model="\ud800")), 400, None),
    ("surrogate stop", CHAT, encoded(chat(stop=["\ud800"])), 400, None),
    ("surrogate user", CHAT, encoded(chat(user="\udbff")), 400, None),
    ("surrogate prompt", "/v1/completions", encoded({"model": SCRIPTED_MODEL, "prompt": ["\ud800"]}), 400,
     None),
    ("surrogate job body", "/v1/jobs", encoded({"endpoint": CHAT, "body": chat(user="\ud800")}), 400, None),
    ("surrogate job metadata key", "/v1/jobs", encoded({"endpoint": CHAT, "body": chat(),
                                                        "metadata": {"\ud800": "v"}}), 400, None),
    ("surrogate batch metadata", "/v1/batches", encoded({"input_file_id": "f", "endpoint": CHAT,
                                                         "completion_window": "24h",
                                                         "metadata": {"k": "\udfff"}}), 400, None),
]

#: Bodies the API admits for vLLM's serving layer to judge (answers compared with vLLM's server:
#: it refuses all but the custom role).
FORWARDED: list[tuple[str, str, bytes, int, str | None]] = [
    ("NaN", CHAT, raw_chat('"x"').replace(b'"max_tokens": 2', b'"temperature": NaN'), 400, None),
    ("Infinity", CHAT, raw_chat('"x"').replace(b'"max_tokens": 2', b'"top_p": Infinity'), 400, None),
    ("content a number", CHAT, encoded(chat(messages=[{"role": "user", "content": 1}])), 400, None),
    ("unknown role", CHAT, encoded(chat(messages=[{"role": "robot", "content": "x"}])), 400, None),
    ("stop numbers", CHAT, encoded(chat(stop=[1])), 400, None),
    ("max_tokens -1", CHAT, encoded(chat(max_tokens=-1)), 400, None),
    ("max_tokens 0", CHAT, encoded(chat(max_tokens=0)), 400, None),
    ("max_completion_tokens -1", CHAT, encoded(chat(max_completion_tokens=-1)), 400, None),
    ("temperature 1e308", CHAT, encoded(chat(temperature=1e308)), 400, None),
    ("temperature -1e308", CHAT, encoded(chat(temperature=-1e308)), 400, None),
    ("top_p 0", CHAT, encoded(chat(top_p=0)), 400, None),
    ("presence_penalty -1e308", CHAT, encoded(chat(presence_penalty=-1e308)), 400, None),
    ("frequency_penalty 3", CHAT, encoded(chat(frequency_penalty=3)), 400, None),
    ("n 0", CHAT, encoded(chat(n=0)), 400, None),
    ("seed 2**64", CHAT, encoded(chat(seed=2**64)), 400, None),
    ("top_k -2", CHAT, encoded(chat(top_k=-2)), 400, None),
    ("min_tokens -1", CHAT, encoded(chat(min_tokens=-1)), 400, None),
    ("completions max_tokens 0", "/v1/completions", encoded({"model": SCRIPTED_MODEL, "prompt": "a",
                                                             "max_tokens": 0}), 400, None),
]
