"""A batch's lease: a short Redis key naming who may change the batch as a whole.

Whoever holds it dispatches the batch's lines, expires the batch or finalizes it;
a holder that stops renewing it for ``LEASE_SECONDS`` is presumed dead, and another
coordinator takes over. Each taking gets its own token, so a holder whose lease
lapsed never lets go of someone else's.
"""

from __future__ import annotations

import os
import secrets
import socket

import redis

from queueing import keys

LEASE_SECONDS = 30
_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_RENEW_LUA = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
              "return redis.call('EXPIRE', KEYS[1], ARGV[2]) end return 0")


class BatchLease:
    """Take, renew and release batches' leases for one process."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self.owner = f"{socket.gethostname()}-{os.getpid()}"

    def take(self, batch_id: str) -> str | None:
        """The lease's token if this call got it; ``None`` if someone holds it."""
        token = f"{self.owner}-{secrets.token_hex(4)}"
        got = self.redis.set(keys.batch_dispatcher(batch_id), token, nx=True, ex=LEASE_SECONDS)
        return token if got else None

    def renew(self, batch_id: str, token: str) -> bool:
        """Hold the lease another ``LEASE_SECONDS``; ``False`` if it lapsed (someone else may hold it
        now, and keeps it: a holder that gets ``False`` must stop changing the batch)."""
        return bool(self.redis.eval(_RENEW_LUA, 1, keys.batch_dispatcher(batch_id), token, LEASE_SECONDS))

    def release(self, batch_id: str, token: str) -> None:
        """Let go of the lease, unless it lapsed and someone else holds it now."""
        self.redis.eval(_RELEASE_LUA, 1, keys.batch_dispatcher(batch_id), token)
