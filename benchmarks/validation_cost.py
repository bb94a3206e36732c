"""What checking a JSON body costs the API, per MiB of JSON: seconds and peak traced memory.

    python -m benchmarks.validation_cost --mib 4 --line-mib 16

Builds chat bodies of ``--mib`` MiB and batch input lines of ``--line-mib`` MiB, benign and
hostile, and runs each through what the API runs on it: a chat body through the capped JSON
parse (``api.http.json_limits.loads``, what the API's JSON provider calls) and admission
(``parse_job_request``, the pydantic models with their lone-surrogate check); an upload line
through the batch file check (``check_batch_input``). The time is the best of ``--repeat``
runs without tracemalloc; the peak comes from one more run with it. Caps are the settings'
(MAX_JSON_ELEMENTS, MAX_JSON_DEPTH); a refused body is reported as such, and the rows marked
``cap`` hold the array shapes just under MAX_JSON_ELEMENTS (the costliest bodies admitted). The
last line is the same as JSON.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable

import click

from api.files.checks import check_batch_input
from api.generation.job_request import parse_job_request
from api.http import json_limits
from api.protocol import ErrorResponse
from config import get_settings
from queueing.jobs import CHAT

MiB = 1024 * 1024
MODEL = "bench-model"


def chat_body(mib: float, shape: str) -> bytes:
    """A chat body of about ``mib`` MiB whose bulk has ``shape``."""
    size = int(mib * MiB)
    base = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    if shape == "prose":
        words = "the quick brown fox jumps over the lazy dog, " * (size // 45)
        base["messages"] = [{"role": "user", "content": words}]
    elif shape == "prose, non-ASCII":
        words = "naïve café 😀 déjà vu, " * (size // 30)
        base["messages"] = [{"role": "user", "content": words}]
    elif shape == "many messages":
        message = {"role": "user", "content": "hello there"}
        base["messages"] = [message] * (size // len(json.dumps(message, separators=(",", ":"))))
    elif shape == "[0,0,...]":
        base["pad"] = [0] * (size // 2)
    elif shape == "[[],[],...]":
        base["pad"] = [[] for _ in range(size // 3)]
    elif shape == '["a","a",...]':
        base["pad"] = ["a"] * (size // 4)
    elif shape == "nested [[[...]]]":
        return b'{"pad": ' + b"[" * (size // 2) + b"]" * (size // 2) + b"}"
    return json.dumps(base, ensure_ascii=False, separators=(",", ":")).encode()


def upload_line(mib: float, shape: str) -> bytes:
    """One batch input line of about ``mib`` MiB: a chat request whose body has ``shape``."""
    body = chat_body(mib, shape)
    return b'{"custom_id": "r1", "method": "POST", "url": "%s", "body": %s}\n' % (CHAT.encode(), body)


def admit_chat(raw: bytes) -> str:
    """What the API does with a chat body before it queues it; the outcome in a few words."""
    try:
        body = json_limits.loads(raw)
    except json_limits.JSONLimitError as exc:
        return f"400: {exc}"
    except (ValueError, RecursionError) as exc:
        return f"400: {type(exc).__name__}"
    job = parse_job_request(CHAT, body)
    return f"400: {job.error.message[:60]}" if isinstance(job, ErrorResponse) else "admitted"


def check_line(raw: bytes) -> str:
    """The upload check of a one-line batch file; the outcome in a few words."""
    result = check_batch_input([raw], get_settings().max_file_lines)
    return f"400: {result.error.message[:60]}" if isinstance(result, ErrorResponse) else "accepted"


def measure(run: Callable[[bytes], str], raw: bytes, repeat: int) -> tuple[str, float, float]:
    """(outcome, best seconds, peak traced MiB) of ``run(raw)``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        outcome = run(raw)
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    run(raw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return outcome, best, peak / MiB


CHAT_SHAPES = ("prose", "prose, non-ASCII", "many messages", "[0,0,...]", "[[],[],...]", '["a","a",...]',
               "nested [[[...]]]")
LINE_SHAPES = ("prose", "[0,0,...]", "[[],[],...]", '["a","a",...]')
#: Bytes and counted values per item of the array shapes (an empty array is a container and
#: a separator): a body of them just under MAX_JSON_ELEMENTS is the costliest one admitted.
ITEMS = {"[0,0,...]": (2, 1), "[[],[],...]": (3, 2), '["a","a",...]': (4, 1)}


@click.command()
@click.option("--mib", default=4.0, show_default=True, help="Size of each chat body (MAX_REQUEST_BYTES: 4).")
@click.option("--line-mib", default=16.0, show_default=True, help="Size of each upload line.")
@click.option("--repeat", default=3, show_default=True, help="Timed runs per case (the best is kept).")
def main(mib: float, line_mib: float, repeat: int) -> None:
    """Print seconds and peak MiB per MiB of JSON for each body shape."""
    settings = get_settings()
    print(f"caps: MAX_JSON_ELEMENTS={settings.max_json_elements} MAX_JSON_DEPTH={settings.max_json_depth}")
    print(f"{'what':<8} {'shape':<18} {'MiB':>6} {'s/MiB':>8} {'peak MiB/MiB':>13}  outcome")
    at_cap = {shape: 0.98 * settings.max_json_elements / values * size / MiB
              for shape, (size, values) in ITEMS.items()}
    cases: list[tuple[str, str, bytes, Callable[[bytes], str]]] = [
        *(("chat", shape, chat_body(mib, shape), admit_chat) for shape in CHAT_SHAPES),
        *(("chat cap", shape, chat_body(at_cap[shape], shape), admit_chat) for shape in ITEMS),
        *(("line", shape, upload_line(line_mib, shape), check_line) for shape in LINE_SHAPES),
        *(("line cap", shape, upload_line(at_cap[shape], shape), check_line) for shape in ITEMS),
    ]
    rows = []
    for what, shape, raw, run in cases:
        size = len(raw) / MiB
        outcome, seconds, peak = measure(run, raw, repeat)
        print(f"{what:<8} {shape:<18} {size:6.1f} {seconds / size:8.4f} {peak / size:13.2f}  {outcome}")
        rows.append({"what": what, "shape": shape, "mib": round(size, 3),
                     "s_per_mib": round(seconds / size, 5), "peak_mib_per_mib": round(peak / size, 3),
                     "outcome": outcome})
    print(json.dumps({"max_json_elements": settings.max_json_elements,
                      "max_json_depth": settings.max_json_depth, "rows": rows}))


if __name__ == "__main__":
    main()
