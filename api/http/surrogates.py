"""Whether parsed JSON is text: the lone surrogate check every request model and batch line passes.

JSON's ``"\\ud800"`` escape decodes to a lone surrogate, a string that cannot be encoded, so
Redis, Celery and the tokenizer would fail on it. :func:`lone_surrogate_at` finds one in a parsed
value in one pass, pausing now and then (issue 15, H2); the caps on the raw text before it is
parsed are api/http/json_limits.py's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Iterator
from itertools import filterfalse
from typing import Any

#: Any surrogate code point: JSON's ``"\\ud800"`` escape decodes to one, and a valid pair of
#: escapes to one character outside the surrogate range, so a string holding one is not text.
SURROGATE = re.compile("[\ud800-\udfff]")
SCALARS = frozenset({int, float, bool, type(None)})
TEXT_OR_SCALARS = SCALARS | {str}
#: Values :func:`lone_surrogate_at` reads between two pauses (``time.sleep(0)``: under gevent,
#: the other greenlets of the API process run).
PAUSE_EVERY = 50_000
#: Containers this large are first checked in C (:func:`_flat_text`); smaller ones are read item
#: by item, which is cheaper for them.
FLAT_CHECK_FROM = 8


def lone_surrogate_at(data: Any) -> str | None:
    """Where ``data`` holds a string with a lone surrogate (JSON's ``"\\ud800"`` decodes to one), if
    anywhere: its dotted path, ``""`` for ``data`` itself.

    Such a string is not text: it cannot be encoded, so Redis, Celery and the tokenizer would fail on it.
    One pass in proportion to the values and the text, holding one iterator per level; containers
    of strings and numbers only are read in C, and the path is spelled out only for the string found.
    """
    keys: list[Any] = []  # the key of each container being read, from the root down
    reading: list[Iterator[tuple[Any, Any]]] = [iter([("", data)])]
    seen, pause_at = 0, PAUSE_EVERY
    while reading:
        for key, value in reading[-1]:
            seen += 1
            if isinstance(value, str):
                if _not_text(value):
                    return _dotted(keys, key)
            elif isinstance(value, (dict, list)):
                if not value:
                    continue
                seen += len(value)
                if seen >= pause_at:
                    pause_at = seen + PAUSE_EVERY
                    time.sleep(0)
                if len(value) > FLAT_CHECK_FROM and _flat_text(value):
                    continue
                bad_key = next((k for k in value if isinstance(k, str) and _not_text(k)), None) \
                    if isinstance(value, dict) else None
                if bad_key is not None:
                    return _dotted([*keys, key], bad_key)
                keys.append(key)
                reading.append(iter(value.items()) if isinstance(value, dict) else enumerate(value))
                break
        else:
            reading.pop()
            if keys:
                keys.pop()
    return None


def _flat_text(container: dict[Any, Any] | list[Any]) -> bool:
    """Whether ``container`` holds only numbers, booleans, nulls and strings that are text (keys
    too), told mostly in C; ``False`` when it must be read item by item (it holds containers, or
    a string that is not text)."""
    items: Collection[Any] = container
    if isinstance(container, dict):
        if set(map(type, container)) != {str} or not _all_text(container):
            return False
        items = container.values()
    kinds = set(map(type, items))
    if kinds <= SCALARS:
        return True
    if not kinds <= TEXT_OR_SCALARS:
        return False
    return _all_text(items if kinds == {str} else [v for v in items if type(v) is str])


def _all_text(strings: Iterable[str]) -> bool:
    return not any(map(SURROGATE.search, filterfalse(str.isascii, strings)))


def _not_text(value: str) -> bool:
    return not value.isascii() and SURROGATE.search(value) is not None


def _dotted(keys: list[Any], key: Any) -> str:
    """The path of ``key`` in the container reached through ``keys`` (the first is the root's)."""
    return ".".join(str(k) for k in [*keys[1:], key])
