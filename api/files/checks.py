"""Validation of batch input files: one JSON request per line, as OpenAI's Batches API takes.

A line looks like ``{"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
"body": {...}}``. The first problem found is reported with its 1-based line number.
No Flask here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from api.http import errors, json_limits
from api.http.surrogates import lone_surrogate_at
from api.protocol import ErrorResponse

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
QUOTED_MAX = 80  # characters of a client's value repeated in a message
MAX_CUSTOM_ID_CHARS = 200  # batch_results.custom_id (OpenAI documents no limit)
MAX_MODEL_CHARS = 200  # usage_ledger.model and batches.model
#: C0 controls (NUL, tab, newline...), DEL and C1 controls: never part of an id or a model name,
#: and PostgreSQL refuses NUL in text outright.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_batch_input(lines: Iterable[bytes], max_lines: int) -> int | ErrorResponse:
    """The number of requests in a batch input file's ``lines``, or 400 naming the first bad line.

    Empty lines are skipped but counted in line numbers, as :meth:`FileStore.iter_lines` counts them.
    """
    seen = _Seen()
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        if len(seen.ids) == max_lines:
            return invalid_file(f"line {line_no}: the file holds more than {max_lines} requests, "
                                "the most one batch may have.")
        request = parse_line(raw)
        if isinstance(request, str):
            return invalid_file(f"line {line_no}: {request}")
        problem = request_problem(request) or seen.add(line_no, request)
        if problem is not None:
            return invalid_file(f"line {line_no}: {problem}")
    if not seen.ids:
        return invalid_file("The file holds no requests: a batch input file has one JSON request per line.")
    return len(seen.ids)


class _Seen:
    """What the earlier lines of a file hold: their custom_ids, and the url and model they share."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}  # custom_id -> its line
        self.url: str | None = None
        self.url_line = 0
        self.model: str | None = None
        self.model_line = 0

    def add(self, line_no: int, request: dict[str, Any]) -> str | None:
        """Record a valid request; what clashes with an earlier line, or ``None``."""
        custom_id, url = request["custom_id"], request["url"]
        if custom_id in self.ids:
            return f"duplicate custom_id {quoted(custom_id)} (first on line {self.ids[custom_id]})."
        if self.url is not None and url != self.url:
            return (f"url {quoted(url)} differs from {quoted(self.url)} on line {self.url_line}: "
                    "all requests of a batch use one url.")
        model = request["body"].get("model")
        if self.model is not None and model is not None and model != self.model:
            return (f"'body.model' {quoted(model)} differs from {quoted(self.model)} on line "
                    f"{self.model_line}: all requests of a batch use one model.")
        if self.url is None:
            self.url, self.url_line = url, line_no
        if self.model is None and model is not None:
            self.model, self.model_line = model, line_no
        self.ids[custom_id] = line_no
        return None


def parse_line(raw: bytes) -> dict[str, Any] | str:
    """The JSON object on one line, or what is wrong with it."""
    try:
        value = json_limits.loads(raw)
    except json_limits.JSONLimitError as exc:
        return f"{exc}."
    except UnicodeDecodeError:
        return "not valid UTF-8 text."
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})."
    except RecursionError:
        return "not valid JSON (nested too deeply)."
    if not isinstance(value, dict):
        return "each line must be a JSON object."
    if lone_surrogate_at(value) is not None:
        return "strings must be valid Unicode: a lone surrogate (\\ud800-\\udfff escape) is not text."
    return value


def request_problem(request: dict[str, Any]) -> str | None:
    """What is wrong with one request of a batch file, or ``None``."""
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string."
    if (problem := name_problem("'custom_id'", custom_id, MAX_CUSTOM_ID_CHARS)) is not None:
        return problem
    if request.get("method") != "POST":
        return f"'method' must be 'POST', not {quoted(request.get('method'))}."
    if request.get("url") not in BATCH_URLS:
        allowed = " or ".join(f"'{u}'" for u in BATCH_URLS)
        return f"'url' must be {allowed}, not {quoted(request.get('url'))}."
    body = request.get("body")
    if not isinstance(body, dict):
        return "'body' must be a JSON object (the request's parameters)."
    if "model" in body:  # a line without one fails alone when it runs (400, like the endpoint)
        model = body["model"]
        if not isinstance(model, str) or not model:
            return "'body.model' must be a non-empty string."
        return name_problem("'body.model'", model, MAX_MODEL_CHARS)
    return None


def name_problem(field: str, value: str, max_chars: int) -> str | None:
    """What is wrong with an identifier a client chose (a custom_id, a model name), or ``None``:
    it is stored in bounded columns and logged, so it must be short and printable."""
    if len(value) > max_chars:
        return f"{field} must be at most {max_chars} characters (it has {len(value)})."
    if (bad := CONTROL_CHARACTER.search(value)) is not None:
        return (f"{field} must not contain control characters (U+{ord(bad.group()):04X} at character "
                f"{bad.start() + 1}).")
    return None


def quoted(value: Any) -> str:
    """A client's value for a message: quoted, and cut short when long."""
    if value is None:
        return "missing"
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= QUOTED_MAX else text[:QUOTED_MAX] + "...")


def invalid_file(message: str) -> ErrorResponse:
    """400 for a file whose content is not a valid batch input."""
    return errors.invalid_request(message, "file", "invalid_file")
