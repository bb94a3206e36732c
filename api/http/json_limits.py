"""Caps on the JSON the API parses (request bodies, batch input lines): how many values, how deep.

Both are counted on the raw text, in one pass, before it is parsed: parsing first would build
every object the text describes (a 4 MiB body of ``[[],[],...]`` is 1.4 million lists, about
90 MB) before anything could count them. The pass runs in C (``bytes`` methods, ``re``) over
windows of the text, holds a few copies of one window at most, and pauses between windows
(``time.sleep(0)``: under gevent the other greenlets of the API process run).

A value is counted for each container and each separator (``,``) outside strings, so an array
of n items counts n, an object of n members n, plus one per container. Text that is not JSON
passes the scan as far as the scan can read it: the parser refuses it afterwards.
"""

from __future__ import annotations

import json
import re
import time
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import BadRequest

from config import Settings, get_settings

WINDOW = 1024 * 1024  # bytes of text scanned between two pauses

#: What the count needs of JSON's syntax: quotes (to tell strings apart) and the punctuation.
SYNTAX = b'",:[]{}'
NOT_SYNTAX = bytes(b for b in range(256) if b not in SYNTAX)
#: A string that still holds punctuation once everything but syntax is gone (``"[,]"``).
PUNCTUATED_STRING = re.compile(rb'"[^"]*"')
BACKSLASHES = re.compile(rb"\\*")
OPENERS, CLOSERS = b"[{", b"]}"
#: Brackets as depth steps (1 opens, -1 as a signed byte closes); everything else is deleted.
STEPS = bytes.maketrans(OPENERS + CLOSERS, b"\x01\x01\xff\xff")
NOT_BRACKETS = bytes(b for b in range(256) if b not in OPENERS + CLOSERS)


@dataclass(frozen=True)
class JSONLimits:
    max_elements: int
    max_depth: int

    @classmethod
    def from_settings(cls, settings: Settings) -> JSONLimits:
        return cls(settings.max_json_elements, settings.max_json_depth)


class JSONLimitError(ValueError):
    """JSON text over a cap; the message says which."""


def over_limits(doc: bytes | bytearray | str, limits: JSONLimits) -> str | None:
    """What cap the JSON text ``doc`` exceeds, as a phrase, or ``None``."""
    text = _utf8(doc)
    elements = depth = 0
    in_string = False
    pos, size = 0, len(text)
    while pos < size:
        end = min(size, pos + WINDOW)
        if text[end - 1] == ord("\\"):  # never cut an escape: take the run of backslashes and its end
            run = BACKSLASHES.match(text, end)
            end = min(size, (run.end() if run else end) + 1)
        skeleton, in_string = _skeleton(text[pos:end], in_string)
        opened = skeleton.count(b"[") + skeleton.count(b"{")
        if depth + opened > limits.max_depth and _too_deep(skeleton, depth, limits.max_depth):
            return f"the JSON nests deeper than {limits.max_depth} levels (MAX_JSON_DEPTH)"
        elements += opened + skeleton.count(b",")
        if elements > limits.max_elements:
            return f"the JSON holds more than {limits.max_elements} values (MAX_JSON_ELEMENTS)"
        depth += opened - skeleton.count(b"]") - skeleton.count(b"}")
        pos = end
        time.sleep(0)
    return None


def _skeleton(window: bytes | bytearray, in_string: bool) -> tuple[bytes, bool]:
    """The punctuation of ``window`` that lies outside strings, and whether the window ends
    inside a string (``in_string``: it starts inside one). Only C loops: escaped backslashes and
    quotes go, then everything but quotes and punctuation; a closing quote is always followed by
    punctuation, so ``""`` is a string without punctuation in it."""
    syntax = window.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, NOT_SYNTAX)
    if in_string:
        syntax = b'"' + syntax
    ends_in_string = syntax.count(b'"') % 2 == 1
    if ends_in_string:
        syntax += b'"'
    syntax = syntax.replace(b'""', b"")
    if b'"' in syntax:
        syntax = PUNCTUATED_STRING.sub(b"", syntax)
    return bytes(syntax), ends_in_string


def loads(doc: bytes | bytearray | str, limits: JSONLimits | None = None) -> Any:
    """``json.loads(doc)`` once ``doc`` passed the caps (the settings' when ``limits`` is None).

    Raises :class:`JSONLimitError` over a cap, and what ``json.loads`` raises.
    """
    problem = over_limits(doc, limits or JSONLimits.from_settings(get_settings()))
    if problem is not None:
        raise JSONLimitError(problem)
    return json.loads(doc)


def _utf8(doc: bytes | bytearray | str) -> bytes | bytearray:
    """``doc`` as UTF-8 bytes, where every byte of JSON's syntax is ASCII (and never part of a
    multibyte character); JSON in UTF-16 or UTF-32, rarely sent, is transcoded first."""
    if isinstance(doc, str):
        return doc.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(doc)
    if encoding in ("utf-8", "utf-8-sig"):
        return doc
    return doc.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")


def _too_deep(skeleton: bytes, depth: int, max_depth: int) -> bool:
    """Whether ``skeleton`` (JSON text without its strings), entered at ``depth``, nests deeper
    than ``max_depth``: a run of more openers than that tells at once, the running depth otherwise."""
    steps = skeleton.translate(STEPS, NOT_BRACKETS)
    if b"\x01" * (max_depth + 1) in steps:
        return True
    return max(accumulate(array("b", steps), initial=depth)) > max_depth


class JSONBodyRefused(BadRequest):
    """400 for a request body over a cap (OpenAI-shaped by the app's HTTP error handler)."""


class LimitedJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, refusing request bodies over the caps before parsing them."""

    def __init__(self, app: Flask, limits: JSONLimits) -> None:
        super().__init__(app)
        self.limits = limits

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        problem = over_limits(s, self.limits)
        if problem is not None:
            raise JSONBodyRefused(f"{problem[0].upper()}{problem[1:]}.")
        return super().loads(s, **kwargs)
