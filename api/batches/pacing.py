"""Pacing of batch lines by their key (issue 15, M4 and M5): a line waits, rather than fails,
while its key has ``KEY_MAX_BATCH_LINES_IN_FLIGHT`` lines in flight or has spent its batch
tokens this minute.

Each line is charged its worst case against a per-minute budget of its own (the key's ``tpm``
again, counted apart from its interactive requests): a running batch never takes what the
key's interactive requests need. A line over the whole budget never fits and fails at once.
:func:`pace` is the wait; :mod:`api.batches.runner` dispatches the lines through it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from api.accounts.ratelimit import KeyRateLimiter, TokenCharge
from api.generation.gateway import BATCH_LINES_FULL, Payer
from api.generation.job_request import worst_case_tokens
from api.protocol import ErrorResponse
from config import Settings
from queueing.jobs import JobRequest

PACE_SECONDS = 0.5  # between two tries of a line while its key is at a cap
OPEN_CHECK_SECONDS = 5.0  # between two looks at the batch's status while a line waits

Result = TypeVar("Result")


class Paced(enum.Enum):
    """What became of a line the dispatcher may have held back while its key had no room."""

    SENT = "sent"  # enqueued, or settled as failed
    STOP = "stop"  # the batch was cancelled, expired or revoked meanwhile
    LOST = "lost"  # the dispatcher's lease lapsed meanwhile


@dataclass(frozen=True)
class Later:
    """A line its key has no room for yet: try it again in ``seconds``."""

    seconds: float


def pace(submit: Callable[[], Result | Later], renew: Callable[[], bool],
         may_dispatch: Callable[[], bool]) -> Result | Paced:
    """``submit()`` again, as long as it answers :class:`Later`, after the pause it asks for: what
    it answered at last, or :attr:`Paced.LOST` once ``renew()`` (of the lease) fails, or
    :attr:`Paced.STOP` when ``may_dispatch()`` (looked at every ``OPEN_CHECK_SECONDS``) says no."""
    waited = 0.0
    while isinstance(result := submit(), Later):
        time.sleep(result.seconds)
        if not renew():
            return Paced.LOST
        waited += result.seconds
        if waited >= OPEN_CHECK_SECONDS:
            waited = 0.0
            if not may_dispatch():
                return Paced.STOP
    return result


def later(refused: ErrorResponse, charge: TokenCharge | None) -> Later | None:
    """When to try a refused line again, if it fits later: its key is at its lines in flight,
    or has spent its batch tokens this minute (a line over the whole budget never fits)."""
    code = refused.error.code
    if code == BATCH_LINES_FULL:
        return Later(PACE_SECONDS)
    if (code == "rate_limit_exceeded" and charge is not None and charge.tpm is not None
            and charge.tokens <= charge.tpm):
        return Later(min(float(refused.retry_after or 1), OPEN_CHECK_SECONDS))
    return None


class BatchTokenBudget:
    """The per-minute token budget of each key's batch lines."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._rate_limits: KeyRateLimiter | None = None

    def charge(self, payer: Payer, job: JobRequest) -> TokenCharge | None:
        """A batch line's worst case against its key's tokens per minute, on a budget of their own
        (the key's ``tpm`` again: a running batch never takes what its interactive requests need)."""
        tpm: int | None = getattr(payer, "tpm", None)
        if tpm is None:
            return None
        if self._rate_limits is None:
            self._rate_limits = KeyRateLimiter(self.settings)
        tokens = worst_case_tokens(job, self.settings.max_model_len)
        return TokenCharge(self._rate_limits, f"{payer.key_id}:batch", tpm, tokens)
