"""A small parser for Grafana Alloy's configuration language, enough for
``compose/alloy/config.alloy``: blocks, attributes, strings, lists, maps and references to
other components' exports (Alloy has no Debian package or binary here to check it with)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tests.compose_files import COMPOSE

ALLOY_CONFIG = COMPOSE / "alloy" / "config.alloy"
# What each Alloy component this config uses exports (Alloy's component reference).
ALLOY_EXPORTS = {"discovery.docker": {"targets"}, "discovery.relabel": {"output", "rules"},
                 "loki.source.docker": set(), "loki.process": {"receiver"}, "loki.write": {"receiver"}}


@dataclass(frozen=True)
class AlloyRef:
    """An expression naming another component's export, e.g. ``loki.write.loki.receiver``."""

    path: str


@dataclass
class AlloyBlock:
    """A block of an Alloy file: ``name "label" { attributes and blocks }``."""

    name: str
    label: str | None
    attributes: dict[str, Any]
    blocks: list[AlloyBlock]

    def all(self, name: str) -> list[AlloyBlock]:
        return [block for block in self.blocks if block.name == name]

    def one(self, name: str) -> AlloyBlock:
        [block] = self.all(name)
        return block


ALLOY_TOKEN = re.compile(r"""(?P<space>\s+|//[^\n]*|/\*.*?\*/)
    | (?P<string>"(?:[^"\\\n]|\\.)*") | (?P<raw>`[^`]*`) | (?P<number>\d+(?:\.\d+)?)
    | (?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*) | (?P<punct>[{}\[\]()=,])""", re.X | re.S)


class AlloyParser:
    """The part of Alloy's syntax a config uses: blocks, attributes, strings, numbers, booleans,
    lists, objects and references (no operators). Anything else is a ValueError."""

    def __init__(self, text: str):
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            match = ALLOY_TOKEN.match(text, pos)
            if match is None:
                raise ValueError(f"unexpected {text[pos:pos + 20]!r} at offset {pos}")
            if match.lastgroup != "space":
                self.tokens.append((str(match.lastgroup), match.group()))
            pos = match.end()
        self.i = 0

    def parse(self) -> AlloyBlock:
        attributes, blocks = self._body("")
        return AlloyBlock("", None, attributes, blocks)

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else ("eof", "")

    def _take(self, expected: str | None = None) -> tuple[str, str]:
        kind, text = self._peek()
        if kind == "eof" or (expected is not None and text != expected):
            raise ValueError(f"expected {expected or 'a token'}, found {text!r} (token {self.i})")
        self.i += 1
        return kind, text

    def _body(self, end: str) -> tuple[dict[str, Any], list[AlloyBlock]]:
        attributes: dict[str, Any] = {}
        blocks: list[AlloyBlock] = []
        while self._peek()[1] != end and self._peek()[0] != "eof":
            kind, name = self._take()
            if kind != "name":
                raise ValueError(f"expected an attribute or a block, found {name!r}")
            if self._peek()[1] == "=":
                self._take("=")
                if name in attributes:
                    raise ValueError(f"attribute {name} set twice")
                attributes[name] = self._value()
                continue
            label = json.loads(self._take()[1]) if self._peek()[0] == "string" else None
            self._take("{")
            inner, nested = self._body("}")
            self._take("}")
            blocks.append(AlloyBlock(name, label, inner, nested))
        if end and self._peek()[0] == "eof":
            raise ValueError("unclosed block")
        return attributes, blocks

    def _value(self) -> Any:
        kind, text = self._take()
        if kind == "string":
            return json.loads(text)
        if kind == "raw":
            return text[1:-1]
        if kind == "number":
            return float(text)
        if text == "[":
            return self._sequence("]", self._value)
        if text == "{":
            return dict(self._sequence("}", self._entry))
        if kind == "name" and text in {"true", "false", "null"}:
            return {"true": True, "false": False, "null": None}[text]
        if kind == "name" and self._peek()[1] != "(":
            return AlloyRef(text)
        raise ValueError(f"unsupported expression at {text!r}")

    def _entry(self) -> tuple[str, Any]:
        kind, key = self._take()
        if kind not in {"name", "string"}:
            raise ValueError(f"bad object key {key!r}")
        self._take("=")
        return (json.loads(key) if kind == "string" else key), self._value()

    def _sequence(self, end: str, item: Any) -> list[Any]:
        items = []
        while self._peek()[1] != end:
            items.append(item())
            if self._peek()[1] != end:
                self._take(",")
        self._take(end)
        return items


def alloy_config() -> AlloyBlock:
    return AlloyParser(ALLOY_CONFIG.read_text()).parse()


def alloy_component(config: AlloyBlock, name: str) -> AlloyBlock:
    [block] = [b for b in config.blocks if b.name == name]
    return block


def alloy_refs(value: Any) -> list[AlloyRef]:
    if isinstance(value, AlloyRef):
        return [value]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in alloy_refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in alloy_refs(item)]
    if isinstance(value, AlloyBlock):
        return alloy_refs(value.attributes) + alloy_refs(value.blocks)
    return []
