"""What the load driver sends: synthetic prompts of a chosen length, or prompts read from JSONL.

A :class:`Workload` hands out one :class:`RequestSpec` per request. Synthetic
prompts are random common English words (about one token each for BPE
tokenizers, exactly one for the scripted test engine), so every request has a
different prefix and a server's prefix cache does not make them free.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter "
    "mother answer found study still learn should world high every near add food between own below country "
    "plant last school father keep tree never start city earth eye light thought head under story saw left"
).split()


class WorkloadError(ValueError):
    """The workload cannot be built (e.g. a bad line in a prompts file)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request's content: a completion prompt or chat messages, and its ``max_tokens``."""

    max_tokens: int
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None

    def as_messages(self) -> list[dict[str, Any]]:
        """Chat messages; a bare prompt becomes one user message."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def as_prompt(self) -> str:
        """A completion prompt; chat messages are joined by newlines."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(str(m.get("content", "")) for m in self.messages or ())


def jittered(mean: int, jitter: float, rng: random.Random) -> int:
    """A length drawn uniformly from ``mean * (1 ± jitter)``, rounded, at least 1."""
    if not 0 <= jitter < 1:
        raise WorkloadError(f"length jitter must be in [0, 1), got {jitter}")
    if jitter == 0:
        return max(1, mean)
    low, high = mean * (1 - jitter), mean * (1 + jitter)
    return max(1, round(rng.uniform(low, high)))


def synthetic_prompt(n_words: int, rng: random.Random) -> str:
    """``n_words`` random common words: about that many tokens."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n_words)))


def _parse_line(text: str, where: str) -> tuple[str | None, tuple[dict[str, Any], ...] | None, int | None]:
    try:
        line = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(line, dict):
        raise WorkloadError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    prompt, messages, max_tokens = line.get("prompt"), line.get("messages"), line.get("max_tokens")
    if (prompt is None) == (messages is None):
        raise WorkloadError(f"{where}: needs exactly one of 'prompt' (a string) or 'messages' (a list)")
    if prompt is not None and not isinstance(prompt, str):
        raise WorkloadError(f"{where}: 'prompt' must be a string")
    if messages is not None and not (
        isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages)
    ):
        raise WorkloadError(f"{where}: 'messages' must be a non-empty list of objects with a 'role'")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or max_tokens < 1):
        raise WorkloadError(f"{where}: 'max_tokens' must be a positive integer")
    return prompt, tuple(messages) if messages is not None else None, max_tokens


def read_prompts(path: str | Path) -> list[tuple[str | None, tuple[dict[str, Any], ...] | None, int | None]]:
    """Parse a prompts JSONL file: one object per line with ``prompt`` or ``messages``, optional
    ``max_tokens``; blank lines are skipped. A bad line raises :class:`WorkloadError` naming it."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                entries.append(_parse_line(text, f"{path}, line {number}"))
    if not entries:
        raise WorkloadError(f"{path}: no prompts (the file is empty)")
    return entries


class Workload:
    """Hands out request specs: the file's prompts in order (cycling), or synthetic ones.

    ``max_tokens`` of a file line wins; otherwise it is drawn around ``max_tokens`` with
    ``jitter``, as is the synthetic prompt's length around ``prompt_tokens``.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, jitter: float = 0.0, seed: int | None = None,
                 prompts_file: str | Path | None = None):
        jittered(max_tokens, jitter, random.Random(0))  # validates jitter up front
        self.prompt_tokens, self.max_tokens, self.jitter = prompt_tokens, max_tokens, jitter
        self.rng = random.Random(seed)
        self.entries = read_prompts(prompts_file) if prompts_file is not None else None
        self._next = 0

    def next(self) -> RequestSpec:
        """The next request's content."""
        if self.entries is None:
            length = jittered(self.prompt_tokens, self.jitter, self.rng)
            return RequestSpec(prompt=synthetic_prompt(length, self.rng),
                               max_tokens=jittered(self.max_tokens, self.jitter, self.rng))
        prompt, messages, max_tokens = self.entries[self._next % len(self.entries)]
        self._next += 1
        return RequestSpec(prompt=prompt, messages=messages,
                           max_tokens=max_tokens or jittered(self.max_tokens, self.jitter, self.rng))
